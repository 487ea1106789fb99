"""The 3-frame GAN's training step, reimplemented as its README describes it: the reference
point that `bench/step.py` times side by side with ours.

The 3-frame GAN: "Video-Colorization-with-GANs" (cs282-video-colorization-team), README and its
published training command

    python gan_main_time.py --batch_size 8 --lr 1e-3 --lamb 20 --ngf 64 --ndf 32
                            --patchGAN --use_lsgan

What the README says, and how it is done here (written plainly, the way that code does it: no
fusion of the three frame passes, no mixed precision, no compile, no channels_last):

- G, an encoder-decoder with skip connections (U-Net). The L channels of frames t-1, t, t+1 go
  through one shared encoder, one frame after the other; each bottleneck gets its own 1x1 conv
  (t: 6 ngf channels, t-1 and t+1: ngf each), the three are concatenated and normalized (the
  bottleneck fusion). The decoder uses transposed convs with skips from frame t (added, as in
  `gan_model_time.py`). "Each block contains Conv (transpose Conv) layer, BatchNormalization
  and Leaky ReLU"; the final activation of G is tanh and G outputs 3-channel RGB.
  Widths ngf, 2 ngf, 4 ngf, 8 ngf, 8 ngf at 1/2 ... 1/32 of the frame side (3x3 stride-2 convs,
  as in its `ConvGenTime`).
- D, `--patchGAN`: 4x4 convs (stride 2, 2, 2, 1, 1; widths ndf, 2, 4, 8 ndf, 1) with spectral
  normalization, LeakyReLU, and a sigmoid at the end ("for discriminator its sigmoid"). It sees
  the RGB frame t alone (real, or G's output).
- Losses, `--use_lsgan --lamb 20`: least squares on D's sigmoid outputs (alpha = 1) plus 20 times
  the L1 pixel loss averaged over the RGB channels.
- Adam, lr 1e-3 for both networks, betas (0.5, 0.999) (from its script); fp32; eager.
- The step, as its `train()` runs it: D on the real frame (backward), G forward, D on the
  detached fake (backward), D step; then G forward *again*, D on the fake, G loss, backward,
  G step. `one_g_forward=True` reuses the first G forward instead (the bench reports both).
- Data, as its `MovieTime` dataset: PIL opens each of the three frames, resizes it to a
  square (its `IMAGE_RESIZE`), converts it to greyscale in [0, 1] (torchvision
  `Grayscale` + `ToTensor`); frame t also as RGB normalized to [-1, 1]. It read PNG files
  from a folder; here the JPEG frames of the same triplet shards the trainer reads, through
  `tarfile`, in a torch `DataLoader` with worker processes.

    python -m bench.reference_step --shards DIR [--size 128] [--steps 3]   # a few steps
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

FRAMES = ("prev", "cur", "next")  # members <key>.prev.jpg, .cur.jpg, .next.jpg of a shard


# ---------------------------------------------------------------------------------------------
# Networks.


def _init(module: nn.Module) -> None:
    # Its initialization: N(0, sqrt(2 / (k * k * c_out))) for every (transposed) conv.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))


class ThreeFrameGenerator(nn.Module):
    """G(now, prev, next), each [B, 1, H, W] greyscale in [0, 1] -> RGB of now [B, 3, H, W]."""

    def __init__(self, ngf: int = 64):
        super().__init__()

        def down(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))

        def up(c_in, c_out):
            return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1,
                                                    output_padding=1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))

        self.down1 = down(1, ngf)  # H/2
        self.down2 = down(ngf, ngf * 2)  # H/4
        self.down3 = down(ngf * 2, ngf * 4)  # H/8
        self.down4 = down(ngf * 4, ngf * 8)  # H/16
        self.down5 = down(ngf * 8, ngf * 8)  # H/32, the bottleneck
        self.conv1x1prev = nn.Conv2d(ngf * 8, ngf, 1, bias=False)
        self.conv1x1now = nn.Conv2d(ngf * 8, ngf * 6, 1, bias=False)
        self.conv1x1next = nn.Conv2d(ngf * 8, ngf, 1, bias=False)
        self.fuse = nn.Sequential(nn.BatchNorm2d(ngf * 8), nn.LeakyReLU(0.1))
        self.up6 = up(ngf * 8, ngf * 8)  # H/16
        self.up7 = up(ngf * 8, ngf * 4)  # H/8
        self.up8 = up(ngf * 4, ngf * 2)  # H/4
        self.up9 = up(ngf * 2, ngf)  # H/2
        self.to_rgb = nn.ConvTranspose2d(ngf, 3, 3, stride=2, padding=1, output_padding=1,
                                         bias=False)  # H
        _init(self)

    def encode(self, x):
        h1 = self.down1(x)
        h2 = self.down2(h1)
        h3 = self.down3(h2)
        h4 = self.down4(h3)
        h5 = self.down5(h4)
        return h5, (h1, h2, h3, h4)

    def forward(self, now, prev, next):
        h_now, (p1, p2, p3, p4) = self.encode(now)
        h_prev, _ = self.encode(prev)
        h_next, _ = self.encode(next)
        h = torch.cat((self.conv1x1prev(h_prev), self.conv1x1now(h_now),
                       self.conv1x1next(h_next)), dim=1)
        h = self.fuse(h)
        h = self.up6(h) + p4
        h = self.up7(h) + p3
        h = self.up8(h) + p2
        h = self.up9(h) + p1
        return torch.tanh(self.to_rgb(h))


class ThreeFramePatchD(nn.Module):
    """D(RGB [B, 3, H, W]) -> per-patch probabilities [B, 1, H/8 - 2, W/8 - 2]."""

    def __init__(self, ndf: int = 32):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.conv1 = sn(nn.Conv2d(3, ndf, 4, stride=2, padding=1))
        self.conv2 = sn(nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1))
        self.conv3 = sn(nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1))
        self.conv4 = sn(nn.Conv2d(ndf * 4, ndf * 8, 4, stride=1, padding=1))
        self.conv5 = sn(nn.Conv2d(ndf * 8, 1, 4, stride=1, padding=1, bias=False))
        _init(self)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.01)
        h = F.leaky_relu(self.conv2(h), 0.01)
        h = F.leaky_relu(self.conv3(h), 0.01)
        h = F.leaky_relu(self.conv4(h), 0.01)
        return torch.sigmoid(self.conv5(h))


# ---------------------------------------------------------------------------------------------
# The training step.


class ThreeFrameGAN:
    def __init__(self, ngf: int = 64, ndf: int = 32, lr: float = 1e-3, lamb: float = 20.0,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.G = ThreeFrameGenerator(ngf).to(self.device).train()
        self.D = ThreeFramePatchD(ndf).to(self.device).train()
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=lr, betas=(0.5, 0.999), eps=1e-8)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr, betas=(0.5, 0.999), eps=1e-8)
        self.lamb = lamb
        self.mse, self.l1 = nn.MSELoss(), nn.L1Loss()

    def gan_loss(self, output, is_real: bool):
        # LSGAN: least squares against 1 (real) or 0 (fake), on D's sigmoid output.
        label = torch.ones_like(output) if is_real else torch.zeros_like(output)
        return self.mse(output, label)

    def step(self, now, prev, next, target, one_g_forward: bool = False) -> dict[str, float]:
        now, prev, next, target = (t.to(self.device) for t in (now, prev, next, target))

        # update D: real, then the detached fake
        self.D.zero_grad()
        err_d_real = self.gan_loss(self.D(target), True)
        err_d_real.backward()
        fake = self.G(now, prev, next)
        err_d_fake = self.gan_loss(self.D(fake.detach()), False)
        err_d_fake.backward()
        self.opt_D.step()

        # update G: the published step runs G forward again
        if not one_g_forward:
            fake = self.G(now, prev, next)
        self.G.zero_grad()
        err_g_gan = self.gan_loss(self.D(fake), True)
        err_g_l1 = self.l1(fake.view(fake.size(0), -1), target.view(target.size(0), -1))
        err_g = err_g_gan + self.lamb * err_g_l1
        err_g.backward()
        self.opt_G.step()
        return {"D": (err_d_real + err_d_fake).item(), "G": err_g.item(),
                "G_gan": err_g_gan.item(), "G_l1": err_g_l1.item()}


# ---------------------------------------------------------------------------------------------
# Data: PIL per frame, the way the 3-frame GAN loads it.


class ThreeFrameTriplets(Dataset):
    """Triplet i of the shards -> (now, prev, next) greyscale [1, S, S], target RGB [3, S, S]."""

    def __init__(self, shards: Path, size: int, split: str = "train"):
        self.size = size
        self.items: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        for tar in sorted(Path(shards).glob(f"{split}-*.tar")):
            with tarfile.open(tar) as t:
                members: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in t.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext.removesuffix(".jpg")] = m
            for frames in members.values():
                if all(f in frames for f in FRAMES):
                    self.items.append((str(tar), frames))
        if not self.items:
            raise FileNotFoundError(f"{shards}: no {split}-*.tar triplets")
        self._tars: dict[str, tarfile.TarFile] = {}  # opened in each worker

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, tar: str, member: tarfile.TarInfo) -> Image.Image:
        if tar not in self._tars:
            self._tars[tar] = tarfile.open(tar)
        data = self._tars[tar].extractfile(member).read()
        return Image.open(io.BytesIO(data)).resize((self.size, self.size))

    @staticmethod
    def _grey(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None]

    @staticmethod
    def _colour(image: Image.Image) -> torch.Tensor:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return (torch.from_numpy(rgb).permute(2, 0, 1) - 0.5) / 0.5

    def __getitem__(self, i: int):
        tar, frames = self.items[i]
        prev, now, next = (self._image(tar, frames[f]) for f in FRAMES)
        return self._grey(now), self._grey(prev), self._grey(next), self._colour(now)


def three_frame_loader(shards: Path, size: int, batch_size: int = 8,
                       workers: int = 2) -> DataLoader:
    return DataLoader(ThreeFrameTriplets(shards, size), batch_size=batch_size, shuffle=True,
                      num_workers=workers, drop_last=True)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reference_step",
                                description="a few training steps of the 3-frame GAN, as published")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    gan = ThreeFrameGAN(args.ngf, args.ndf)
    batches = iter(three_frame_loader(args.shards, args.size, args.batch_size, args.workers))
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses = gan.step(*next(batches))
        print(f"step {i}: {time.perf_counter() - t0:.2f} s  "
              + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
