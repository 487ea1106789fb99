"""The webdataset backend of `TripletLoader`: for hosts without DALI (macOS, aarch64).

The webdataset library streams this rank's shards in a torch DataLoader; decoding (PIL),
crop and flip run in the workers. Rank r reads the same contiguous slice of the sample list
as DALI's `shard_id=r`. Everything random is seeded by (seed, epoch, rank, worker or key), and
the DataLoader hands out worker outputs in a fixed round-robin order, so an epoch is a
deterministic sequence: resuming replays it and drops the batches already trained on.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.samples import FLOW_MEMBERS, FRAME_MEMBERS


def centre_start(side: int, crop: int) -> int:
    """Where the centre crop starts: round-half-up((side - crop) / 2), as DALI's crop_pos 0.5."""
    return (side - crop + 1) // 2


def centre_crop(frames: list[np.ndarray], crop: int) -> np.ndarray:
    """The centre crop of the images (three frames, and the flows), nothing random
    (validation) -> [N, crop, crop, 3]."""
    h, w = frames[0].shape[:2]
    y, x = centre_start(h, crop), centre_start(w, crop)
    return np.ascontiguousarray(np.stack([f[y : y + crop, x : x + crop] for f in frames]))


def crop_and_flip(frames: list[np.ndarray], crop: int, flip: bool, jitter: float, rng,
                  flows: list[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """The same random crop and flip for the three frames and the flow images, brightness
    for the frames only -> ([3, crop, crop, 3], [2, crop, crop, 3] or None, mirrored)."""
    h, w = frames[0].shape[:2]
    y, x = rng.randint(0, h - crop), rng.randint(0, w - crop)
    mirror = flip and rng.random() < 0.5
    gain = rng.uniform(1 - jitter, 1 + jitter) if jitter > 0 else 1.0
    out, fl = (np.stack([f[y : y + crop, x : x + crop] for f in images]) if images else None
               for images in (frames, flows))
    if mirror:
        out = out[:, :, ::-1]
        fl = fl[:, :, ::-1] if fl is not None else None
    if gain != 1.0:
        out = np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return (np.ascontiguousarray(out), None if fl is None else np.ascontiguousarray(fl),
            mirror)


def read_images(sample: dict, members) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(sample[m])).convert("RGB")) for m in members]


class _RankSamples(IterableDataset):
    def __init__(self, tars, keys, cfg, seed, epoch, rank, shuffle, augment, flow=False):
        self.tars, self.cfg, self.shuffle, self.augment = tars, cfg, shuffle, augment
        self.flow = flow
        self.position = {k: i for i, k in enumerate(keys)}
        self.seed = (seed, epoch, rank)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = {k for k, i in self.position.items() if i % workers == worker}
        pipeline = wds.WebDataset(
            self.tars, shardshuffle=False, nodesplitter=None, workersplitter=None,
            empty_check=False,
            # The start-up scan already reported and excluded every damaged sample; what
            # webdataset trips over here (e.g. the cut end of a truncated tar) is among them.
            handler=wds.ignore_and_continue,
        ).select(lambda s: s["__key__"] in mine)  # bad or trimmed samples are not in `mine`
        if self.shuffle:
            pipeline = pipeline.shuffle(1000, rng=random.Random(str((*self.seed, worker))))
        cfg = self.cfg
        for sample in pipeline:
            rng = random.Random(str((*self.seed, sample["__key__"])))
            frames = read_images(sample, FRAME_MEMBERS)
            flows = read_images(sample, FLOW_MEMBERS) if self.flow else []
            if self.augment:
                triplet, flow, mirror = crop_and_flip(frames, cfg.crop_size, cfg.flip,
                                                      cfg.brightness_jitter, rng, flows)
            else:
                triplet, mirror = centre_crop(frames, cfg.crop_size), False
                flow = centre_crop(flows, cfg.crop_size) if flows else None
            extras = None if flow is None else (torch.from_numpy(flow), mirror)
            yield torch.from_numpy(triplet), sample["__key__"], extras


class WebDatasetSource:
    def __init__(self, loader):
        self.loader = loader
        keys = loader.samples.keys()
        n = loader.samples_per_rank
        self.keys = keys[loader.rank * n : (loader.rank + 1) * n]
        wanted = set(self.keys)
        self.tars = [
            str(s.tar) for s in loader.samples.shards
            if any(line.split()[3].split(".", 1)[0] in wanted for line in s.lines)
        ]
        self._start_epoch(skip_batches=loader._step)

    def _start_epoch(self, skip_batches: int = 0) -> None:
        loader = self.loader
        dataset = _RankSamples(self.tars, self.keys, loader.cfg, loader.seed, loader.epoch,
                               loader.rank, loader.shuffle, loader.augment, loader.flow)
        workers = loader.cfg.num_threads
        self._samples = iter(DataLoader(dataset, batch_size=None, num_workers=workers,
                                        persistent_workers=False))
        for _ in range(skip_batches * loader.cfg.batch_size):  # replay up to the saved step
            next(self._samples)

    def next(self):
        # Batched here, not in the workers: per-worker batches would leave a partial batch
        # in every worker and change the number of batches per epoch.
        if self._samples is None:
            self._start_epoch()
        frames, keys, extras = zip(*(next(self._samples)
                                     for _ in range(self.loader.cfg.batch_size)))
        if extras[0] is None:
            return torch.stack(frames), list(keys), None
        flows, mirrors = zip(*extras)
        return torch.stack(frames), list(keys), (torch.stack(flows), torch.tensor(mirrors))

    def end_epoch(self) -> None:
        self._samples = None  # the next call starts the loader's next epoch

    def state(self):
        return None  # the position is (epoch, step), which the loader saves itself
