"""The variants `python -m bench.step` times, and how each is built inside its worker: ours
(the trainer's `build_gan` + `train_step` at the 3-frame GAN's settings) and that system's own
step (bench/reference_step.py); the FLOP count of a step and the device's measured dense peak.
gpu/stages.py builds `ours` at the real shape with the same code."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import sync

# The 3-frame GAN's published configuration, as settings of this system (configs/zootopia.yaml
# at the time of writing, pinned here so that a change of the preset does not move the bench).
OURS_SETTINGS = [
    "model.mode=grey", "model.depth=5", "model.norm=batch", "model.d_head=patch",
    "model.d_conditional=true", "model.d_temporal=false", "model.temporal=true",
    "loss.adversarial=lsgan", "loss.pixel=l1", "loss.lambda_pixel=20.0", "loss.lambda_adv=1.0",
    "optim.lr_g=1e-3", "optim.lr_d=1e-3", "optim.beta1=0.5", "optim.beta2=0.999",
    "optim.d_steps_per_g=1", "optim.grad_clip=0.0", "train.grad_accum=1",
]


@dataclass(frozen=True)
class Variant:
    # "ours" | "seed": the 3-frame GAN's step as published | "seed-1fwd": it with one G
    # forward per step (the names stay: they are the labels of the tables and JSON)
    model: str
    size: int  # frame side, pixels
    batch: int  # triplets per step
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast through Accelerate)
    compile: bool = False  # torch.compile (inductor) through Accelerate
    channels_last: bool = False
    ngf: int = 64
    ndf: int = 32

    @property
    def label(self) -> str:
        if self.model != "ours":
            return {"seed": "seed (as published)", "seed-1fwd": "seed (1 G forward)"}[self.model]
        parts = [f"ours ngf={self.ngf}", self.precision]
        parts.append("compile" if self.compile else "eager")
        if self.channels_last:
            parts.append("channels_last")
        return " ".join(parts)

    @property
    def flops_key(self) -> str:
        return f"{self.model}/{self.size}/{self.ngf}/{self.ndf}"


@dataclass
class Group:
    size: int
    batch: int
    rounds: int
    variants: list[Variant]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them oneDNN emulates bf16 convolutions, measured at ~15x
    the fp32 cost on an AVX2-only EPYC (G forward + backward, 128², batch 8: 24 s vs 1.7 s)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precisions_available(device: str) -> list[str]:
    if device == "cuda":
        return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    # CPU autocast: bf16 only (fp16 autocast is GPU-only here), and only where it is native
    return ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]


# ---------------------------------------------------------------------------------------------
# Building a variant inside its worker: a function that runs one step on resident batches.


def ours_config(v: Variant, shards: str | None):
    from trainer.config import load_config

    return load_config(None, [
        f"data.shards={shards or 'unused'}", "data.backend=webdataset", "data.num_threads=1",
        f"data.crop_size={v.size}", f"data.batch_size={v.batch}",
        *OURS_SETTINGS, f"model.ngf={v.ngf}", f"model.ndf={v.ndf}",
        f"train.channels_last={v.channels_last}",
    ])


def ours_batches(cfg, v: Variant, shards: str | None, device: torch.device, n: int) -> list:
    from trainer.data import Batch, TripletLoader

    if shards is None:
        g = torch.Generator().manual_seed(0)
        return [Batch(
            (torch.rand(v.batch, 3, 1, v.size, v.size, generator=g) * 2 - 1).to(device),
            (torch.rand(v.batch, 3, 2, v.size, v.size, generator=g) * 2 - 1).to(device),
            [],
        ) for _ in range(n)]
    loader = TripletLoader(cfg.data, "grey", "train", 0, 1, device, seed=0)
    batches = list(itertools.islice(iter(loader), n))
    del loader
    return batches


def build_ours(v: Variant, shards: str | None, device: torch.device, n_batches: int):
    from accelerate import Accelerator

    from trainer.step import train_step
    from trainer.train import build_gan

    cfg = ours_config(v, shards)
    accelerator = Accelerator(
        mixed_precision="no" if v.precision == "fp32" else v.precision,
        cpu=device.type == "cpu",
        dynamo_backend="inductor" if v.compile else "no",
    )
    torch.manual_seed(0)
    gan = build_gan(cfg, accelerator)  # train.channels_last converts G, D and the EMA copy
    batches = itertools.cycle(ours_batches(cfg, v, shards, accelerator.device, n_batches))

    def step() -> None:
        train_step(accelerator, gan, next(batches))

    params = sum(p.numel() for m in (gan.G, gan.D) for p in m.parameters())
    return step, params


def reference_batches(v: Variant, shards: str | None, device: torch.device, n: int) -> list:
    if shards is None:
        g = torch.Generator().manual_seed(0)
        shapes = [(1,), (1,), (1,), (3,)]
        return [[torch.rand(v.batch, *c, v.size, v.size, generator=g).to(device)
                 for c in shapes] for _ in range(n)]
    from torch.utils.data import default_collate

    from bench.reference_step import ThreeFrameTriplets

    ds = ThreeFrameTriplets(Path(shards), v.size)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    batches = []
    for k in range(n):
        items = [ds[i] for i in order[k * v.batch : (k + 1) * v.batch]]
        batches.append([t.to(device) for t in default_collate(items)])
    return batches


def build_reference(v: Variant, shards: str | None, device: torch.device, n_batches: int):
    from bench.reference_step import ThreeFrameGAN

    torch.manual_seed(0)
    gan = ThreeFrameGAN(v.ngf, v.ndf, device=device)
    batches = itertools.cycle(reference_batches(v, shards, device, n_batches))
    one_g_forward = v.model == "seed-1fwd"

    def step() -> None:
        gan.step(*next(batches), one_g_forward=one_g_forward)

    params = sum(p.numel() for m in (gan.G, gan.D) for p in m.parameters())
    return step, params


def build(v: Variant, shards: str | None, device: torch.device, n_batches: int):
    """(a function running one training step of `v`, its parameter count)."""
    return (build_ours if v.model == "ours" else build_reference)(v, shards, device, n_batches)


# ---------------------------------------------------------------------------------------------
# FLOPs and the device's measured peak, counted in one reference worker before any timing.


def count_flops(v: Variant, device: torch.device) -> float:
    """Model FLOPs of one training step per triplet (counted at batch 1, fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = Variant(v.model, v.size, 1, ngf=v.ngf, ndf=v.ndf)
    step, _ = build(one, None, device, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def best_rate(fn, flop: float, device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return flop / best


def dense_peak(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Best throughput (FLOP/s) seen with this process's threads: a square matmul, and a 3x3
    conv in channels_last (on CPUs torch's fp32 matmul goes to MKL, which on some CPUs reaches
    half of what oneDNN's convolutions do; the peak is the larger of the two)."""
    gpu = device.type == "cuda"
    n, reps = (8192, 20) if gpu else (2048, 6)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul = best_rate(lambda: a @ b, 2.0 * n**3, device, reps)
    batch, c, side = (64, 256, 64) if gpu else (4, 256, 64)
    x = torch.randn(batch, c, side, side, device=device, dtype=dtype)
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    conv = best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                     2.0 * batch * side * side * c * c * 9, device, reps)
    return {"matmul": matmul, "conv3x3": conv, "peak": max(matmul, conv)}

