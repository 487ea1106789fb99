"""The alternatives `python -m bench.data` measures beside the trainer's loaders: the naive
baseline's dataset (`NaiveTriplets`) and a faster RGB -> Lab conversion by lookup table
(`--lab-impl lut`, a proposed change to trainer/data/transforms.py)."""

from __future__ import annotations

import functools
import io
import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from models.colour import AB_SCALE, L_SCALE
from trainer.data.samples import FRAME_MEMBERS, SampleSet
from trainer.data.transforms import condition_and_target

# ---------------------------------------------------------------------------------------------
# The naive baseline: PIL per frame in a map-style Dataset, the way the published systems
# (the 3-frame GAN, TCVC) load frames.


class NaiveTriplets(Dataset):
    """Sample i -> uint8 RGB triplet [3, crop, crop, 3], read from the tar by its offsets."""

    def __init__(self, samples: SampleSet, crop: int, flip: bool = True):
        self.crop, self.flip = crop, flip
        self.items: list[tuple[str, list[tuple[int, int]]]] = []
        for shard in samples.shards:
            for line in shard.lines:
                fields = line.split()  # "ext offset size name" per member
                members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]))
                           for i in range(0, len(fields), 4)}
                self.items.append((str(shard.tar), [members[m] for m in FRAME_MEMBERS]))
        self._files: dict[str, io.BufferedReader] = {}  # opened lazily, in each worker

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        tar, members = self.items[i]
        if tar not in self._files:
            self._files[tar] = open(tar, "rb")  # kept open for the worker's lifetime
        f = self._files[tar]
        frames = []
        for offset, size in members:
            f.seek(offset)
            image = Image.open(io.BytesIO(f.read(size))).convert("RGB")  # the full frame
            frames.append(np.asarray(image))
        h, w = frames[0].shape[:2]
        y, x = random.randint(0, h - self.crop), random.randint(0, w - self.crop)
        out = np.stack([f[y : y + self.crop, x : x + self.crop] for f in frames])
        if self.flip and random.random() < 0.5:
            out = out[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out))


def seed_worker_rng(worker_id: int) -> None:
    """DataLoader worker_init_fn: Python's `random` per worker, from torch's seed."""
    random.seed(torch.initial_seed() % 2**32)


# ---------------------------------------------------------------------------------------------
# A faster RGB -> Lab for uint8 frames, tried here before it goes into trainer/data/transforms:
# sRGB -> linear is a 256-entry table (the input is uint8), the white point is folded into the
# RGB -> XYZ matrix and the [-1, 1] normalization into the L, a, b formulas; one matmul on the
# channels-last data instead of a permute + per-channel arithmetic. Same result within 1e-6.

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_SRGB = torch.arange(256, dtype=torch.float64) / 255.0
SRGB_TO_LINEAR = torch.where(
    _SRGB > 0.04045, ((_SRGB + 0.055) / 1.055) ** 2.4, _SRGB / 12.92
).float()
LINEAR_TO_XYZ_WHITE = (_RGB_TO_XYZ / _WHITE_D65[:, None]).T.float().contiguous()


def fast_rgb_to_lab_triplets(frames: Tensor) -> Tensor:
    """Same contract as `trainer.data.transforms.rgb_to_lab_triplets`."""
    b, t, h, w, _ = frames.shape
    dev = frames.device
    with torch.autocast(dev.type, enabled=False):
        linear = SRGB_TO_LINEAR.to(dev)[frames.long()]  # [B, T, H, W, 3]
        xyz = linear.reshape(-1, 3) @ LINEAR_TO_XYZ_WHITE.to(dev)  # already / white point
        eps = 0.008856  # kornia's constants, so that both agree
        f = torch.where(xyz > eps, xyz.clamp(min=eps).pow(1.0 / 3.0), 7.787 * xyz + 4.0 / 29.0)
        fx, fy, fz = f.unbind(-1)
        lab = torch.stack([
            fy * (116.0 / L_SCALE) - (16.0 / L_SCALE + 1.0),
            (fx - fy) * (500.0 / AB_SCALE),
            (fy - fz) * (200.0 / AB_SCALE),
        ])  # [3, N]
        return lab.reshape(3, b, t, h, w).permute(1, 2, 0, 3, 4)


fast_condition_and_target = functools.partial(condition_and_target,
                                              to_lab=fast_rgb_to_lab_triplets)


LAB_IMPLS = {"kornia": condition_and_target, "lut": fast_condition_and_target}
