"""The stages of `make gpu-check` (bench/gpu_check.py runs each in a process of its own, under
its own time limit, and writes the report). One stage by hand:

    python -m bench.gpu_stages STAGE --work DIR --result RESULT.json [--device cuda]

A stage returns its figures and records named checks; a failed check fails the stage, an
exception fails it too (with the traceback), `Skip` skips it (a package the host lacks).
Everything here also runs on CPU (`--device cpu`, tiny shapes: tests/test_gpu_check.py), where
the sync census counts nothing: torch's sync debug mode exists on CUDA only.

Stage shards are built by `make gpu-wheels` on the CPU side (the GPU host lacks PyAV, which
decoding videos needs) into .gpu-wheels/base/shards: `small` (crop 64 trainer runs, with a
val split) and `large` (512x512 frames, for DALI at crop 480).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch's sync-debug warning


class Skip(Exception):
    """The stage cannot run here (a package the host lacks): reported as skipped."""


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # the stage's own time limit (its process is killed after it)
    what: str
    optional: bool = False  # started only when its whole budget is left


# The order they run in, and their limits: 480 s in all, the install step included
# (bench/gpu_check.py: INSTALL_BUDGET_S); docs/gpu-check.md has the same table.
STAGES = [
    Stage("env", 20, "versions (torch, CUDA, cuDNN, NCCL, driver, DALI), GPU, a bf16 matmul"),
    Stage("dali", 60, "DALI mixed vs CPU decode (|d| <= 3), checkpoint round trip on the GPU, "
                      "crop-480 throughput with num_threads 2 and 8"),
    Stage("census_fp32", 25, "host syncs per train_step under sync debug mode, grey + line art"),
    Stage("census_bf16", 25, "the same under bf16 autocast"),
    Stage("resume_exactness", 40, "in-memory snapshot after 3 steps, 5 more, restore, the same 5 "
                                  "again: max |A-B| per network, bf16 and fp32, default and "
                                  "deterministic algorithms; the bf16 EMA copy's forward (P1)"),
    Stage("train_bf16", 100, "accelerate launch (multi_gpu.yaml, NCCL, world 1) bf16 60 steps "
                             "with checkpoints, validation, images; resume to 90"),
    Stage("train_fp16", 55, "the same in fp16: 20 steps, resume to 40 (the M1 resume crash)"),
    Stage("step_480", 55, "train_step at 480x480 batch 8 bf16 (bench.step's build_ours): "
                          "channels_last x cudnn.benchmark, step time and peak memory"),
    Stage("deepspeed", 40, "ZeRO-2 fp16 20 steps, save, resume to 30 (if deepspeed imports)",
          optional=True),
]
BY_NAME = {s.name: s for s in STAGES}


class Context:
    """What a stage gets: where to work, the stage shards, the device; collects checks."""

    def __init__(self, work: Path, shards: Path, device: str = "cuda", tiny: bool = False):
        self.work, self.shards, self.device, self.tiny = work, shards, device, tiny
        self.checks: list[dict] = []

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": str(detail)})
        print(f"check {'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
        return bool(ok)


# ---------------------------------------------------------------------------------------------
# Shards (built on the CPU side; see the module docstring).


SHARD_SETS = {
    # name: (clips as (scene lengths, width, height), short side, val fraction)
    "small": ([([20, 20, 20], 192, 128), ([20, 20], 192, 128)], 128, 0.25),
    "large": ([([26], 512, 512)], 512, 0.0),
}


def build_stage_shards(out: Path, scale: float = 1.0) -> dict:
    """Synthetic clips (tests/videos.py, PyAV) -> `out/<set>` shards, verified; returns
    {set: bytes}. `scale` < 1 shrinks the clips (tests)."""
    import tempfile

    from shards.cli import main as shards_main
    from tests.videos import scene_video

    sizes = {}
    for name, (clips, short, val) in SHARD_SETS.items():
        short = max(16, int(short * scale) // 16 * 16)
        with tempfile.TemporaryDirectory(prefix="tricolor-gpu-clips-") as tmp:
            videos = []
            for i, (scenes, w, h) in enumerate(clips):
                w, h = max(16, int(w * scale) // 16 * 16), max(16, int(h * scale) // 16 * 16)
                videos.append(str(scene_video(Path(tmp) / f"{name}{i}.mp4", scenes, w, h)))
            argv = ["build", *videos, "--out", str(out / name), "--overwrite",
                    "--short-side", str(short), "--val-fraction", str(val),
                    "--samples-per-shard", "64"]
            with contextlib.redirect_stdout(sys.stderr):
                if shards_main(argv) != 0 or shards_main(["verify", str(out / name)]) != 0:
                    raise RuntimeError(f"building the {name} stage shards failed")
        sizes[name] = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
    return sizes


# ---------------------------------------------------------------------------------------------
# The sync census.


def count_sync_warnings(records) -> tuple[int, Counter]:
    """(how many of these `warnings.catch_warnings(record=True)` records are torch's sync
    debug warnings, and where they came from: "file:line" of the Python caller)."""
    sites: Counter = Counter()
    for r in records:
        if SYNC_MESSAGE in str(r.message):
            path = Path(r.filename)
            with contextlib.suppress(ValueError):
                path = path.resolve().relative_to(ROOT)
            sites[f"{path}:{r.lineno}"] += 1
    return sum(sites.values()), sites


class SyncCensus:
    """Counts host syncs in a block: `with census.count() as n: ...; n[0]` is how many.
    On CUDA it turns torch's sync debug mode to "warn" for the block; all sites are summed
    in `self.sites`."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.sites: Counter = Counter()

    @contextlib.contextmanager
    def count(self):
        import torch

        result = [0]
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
        result[0], sites = count_sync_warnings(records)
        self.sites.update(sites)


def census(ctx: Context, precision: str) -> dict:
    """host syncs of `condition_and_target` (the loader's GPU transform), `train_step` and the
    stop agreement, per step, in grey and line-art mode, at world 1 (no SyncBatchNorm)."""
    import torch
    from accelerate import Accelerator

    from tests.videos import textured_frames  # numpy only: PyAV is imported where it encodes
    from trainer.config import load_config
    from trainer.data import Batch
    from trainer.data.transforms import condition_and_target
    from trainer.step import train_step
    from trainer.stop import StopRequest
    from trainer.train import build_gan

    cuda = ctx.device == "cuda"
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              cpu=not cuda)
    device = accelerator.device
    crop, batch_size, steps = (32, 2, 2) if ctx.tiny else (256, 8, 6)
    figures: dict = {"crop": crop, "batch": batch_size, "steps": steps}
    for mode in ("grey", "lineart"):
        cfg = load_config(DEMO, [f"data.shards={ctx.shards / 'small'}", f"model.mode={mode}",
                                 f"data.crop_size={crop}", f"data.batch_size={batch_size}"])
        torch.manual_seed(0)
        gan = build_gan(cfg, accelerator)
        counter = SyncCensus(cuda)
        frames = torch.stack([torch.from_numpy(x.copy()) for x in textured_frames(
            3 * batch_size, crop, crop, seed=1)]).reshape(batch_size, 3, crop, crop, 3)
        frames = frames.to(device)  # uploaded outside the census: DALI gives device tensors
        transform, step_syncs = [], []
        stop = StopRequest(None)
        try:
            for i in range(steps):
                with counter.count() as n:
                    cond, target = condition_and_target(frames, mode,
                                                        cfg.data.canny_low, cfg.data.canny_high)
                transform.append(n[0])
                with counter.count() as n:
                    train_step(accelerator, gan, Batch(cond, target, []), i)
                step_syncs.append(n[0])
            with counter.count() as n:
                stop.agreed(device)
            stop_syncs = n[0]
        finally:
            stop.close()
        if cuda:
            torch.cuda.synchronize()
        figures[mode] = {
            "transform_syncs_per_batch": transform,
            "train_step_syncs_per_step": step_syncs,
            "train_step_syncs_median_after_first": statistics.median(step_syncs[1:] or
                                                                     step_syncs),
            "stop_agreed_syncs": stop_syncs,
            "sites": dict(counter.sites.most_common(12)),
        }
        ctx.check(f"{mode}: steps ran", len(step_syncs) == steps, step_syncs)
        del gan
    return figures


# ---------------------------------------------------------------------------------------------
# Resume exactness: an in-memory snapshot and restore, the same batches after it.


# CUDA resume tolerance (docs/gpu-check.md): max |A - B| / max |A| over each network's
# floating-point state (G, D, the EMA copy), after RESUME_STEPS steps from the restored
# snapshot. On the CPU a resume is bitwise exact (README: Resume), so there it is 0.
RESUME_TOLERANCE = {"bf16": 1e-2, "fp32": 1e-4}
RESUME_WARMUP, RESUME_STEPS = 3, 5  # steps before the snapshot, steps after it (twice)
GATED = ("G", "D", "G_ema")  # what the tolerance applies to; the optimizers' moments are figures
NONDETERMINISTIC = "does not have a deterministic implementation"


def _fresh_accelerator(precision: str, cpu: bool):
    """A new Accelerator of this precision: Accelerate keeps one state per process."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=cpu)


def training_state(gan) -> dict[str, dict]:
    """Every tensor a resume restores, by part: G, D, G_ema (with its update count) and both
    optimizers' states (flattened: "<param index>.<name>"). References, not copies."""
    unwrap = gan.backend.unwrap
    out = {"G": dict(unwrap(gan.G).state_dict()), "D": dict(unwrap(gan.D).state_dict()),
           "G_ema": dict(gan.ema.state_dict())}
    for name, opt in (("opt_G", gan.opt_G), ("opt_D", gan.opt_D)):
        out[name] = {f"{i}.{k}": v for i, state in opt.state_dict()["state"].items()
                     for k, v in state.items() if hasattr(v, "dtype")}
    return out


def snapshot(gan, cuda: bool) -> dict:
    """The whole training state in memory (what a checkpoint holds): deep copies of the
    networks', the EMA's and the optimizers' state_dicts, the backend's (fp16 scaler) and the
    RNG states."""
    import copy

    import torch

    unwrap = gan.backend.unwrap
    return copy.deepcopy({
        "G": unwrap(gan.G).state_dict(), "D": unwrap(gan.D).state_dict(),
        "G_ema": gan.ema.state_dict(), "opt_G": gan.opt_G.state_dict(),
        "opt_D": gan.opt_D.state_dict(), "backend": gan.backend.trainer_state(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if cuda else None,
    })


def restore(gan, state: dict) -> None:
    import torch

    unwrap = gan.backend.unwrap
    unwrap(gan.G).load_state_dict(state["G"])
    unwrap(gan.D).load_state_dict(state["D"])
    gan.ema.load_state_dict(state["G_ema"])
    gan.opt_G.load_state_dict(state["opt_G"])
    gan.opt_D.load_state_dict(state["opt_D"])
    gan.backend.load_trainer_state(state["backend"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def state_differences(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Per part: max |a - b| over its floating-point tensors, that over max |a| ("max_rel"),
    the tensor where it is largest ("" when none differs), and whether every tensor (integer
    ones too) is equal."""
    out = {}
    for part, tensors in a.items():
        num, den, worst, bitwise = 0.0, 0.0, "", True
        for name, x in tensors.items():
            y = b[part][name]
            bitwise = bitwise and x.shape == y.shape and bool((x == y).all())
            if x.is_floating_point() and x.numel():
                d = float((x.double() - y.double()).abs().max())
                den = max(den, float(x.double().abs().max()))
                if d > num:
                    num, worst = d, name
        out[part] = {"max_abs": num, "max_rel": num / den if den > 0 else num,
                     "bitwise": bitwise, "worst": worst}
    return out


def ema_forward_checks(ctx: Context, gan, batch, label: str) -> dict:
    """P1: the EMA copy runs the class's forward in fp32, not the training G's autocast
    wrapper that Accelerate puts on the instance (and `copy.deepcopy` would carry over)."""
    import torch

    from trainer.step import generate

    ema = gan.ema.model
    instance = sorted(k for k in ("forward", "_original_forward") if k in ema.__dict__)
    ctx.check(f"{label}: gan.ema.model.forward is the class's forward (no instance forward)",
              not instance and getattr(ema.forward, "__func__", None) is type(ema).forward,
              f"instance attributes: {instance}" if instance else "")
    with torch.no_grad():
        out, _ = generate(gan, ema, batch)
    dtypes = sorted({str(p.dtype) for p in ema.parameters()})
    ctx.check(f"{label}: the EMA output is float32", out.dtype == torch.float32, out.dtype)
    ctx.check(f"{label}: the EMA parameters are float32", dtypes == ["torch.float32"], dtypes)
    return {"training_G_has_instance_forward":
            "forward" in gan.backend.unwrap(gan.G).__dict__,
            "ema_instance_attributes": instance, "ema_output_dtype": str(out.dtype)}


def resume_run(ctx: Context, cfg, precision: str, batches: list, warmup: int, steps: int,
               p1: bool = False) -> tuple[dict, dict]:
    """Build the GAN as the trainer does, `warmup` steps, snapshot, `steps` more (A), restore,
    the same `steps` on the same batches (B): (differences of A and B, P1 figures)."""
    import torch

    from bench.step import _device, _sync
    from trainer.step import train_step
    from trainer.train import build_gan

    cuda = ctx.device == "cuda"
    accelerator = _fresh_accelerator(precision, cpu=not cuda)
    torch.manual_seed(0)
    gan = build_gan(cfg, accelerator)
    p1_figures = ema_forward_checks(ctx, gan, batches[0], precision) if p1 else {}
    for i in range(warmup):
        train_step(accelerator, gan, batches[i], i)
    saved = snapshot(gan, cuda)
    runs = []
    for _ in range(2):
        for i in range(warmup, warmup + steps):
            train_step(accelerator, gan, batches[i], i)
        _sync(_device(ctx.device))
        runs.append({part: {k: v.detach().clone() for k, v in tensors.items()}
                     for part, tensors in training_state(gan).items()})
        restore(gan, saved)
    return state_differences(*runs), p1_figures


@contextlib.contextmanager
def algorithms(deterministic: bool, warn_only: bool, cuda: bool):
    """torch.use_deterministic_algorithms and cuDNN's switches for a block; the default mode
    times cuDNN's algorithms as the trainer does on CUDA (trainer/main.py)."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = cuda and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]


def nondeterministic_op(message: str) -> str:
    """The op named by torch's "X does not have a deterministic implementation" message."""
    return message.split(NONDETERMINISTIC)[0].strip().split()[-1] if NONDETERMINISTIC in \
        message else message.strip().splitlines()[0]


def resume_exactness(ctx: Context) -> dict:
    """Resume against no resume, in memory, with the trainer's GAN (build_gan, a bf16 or fp32
    Accelerator): RESUME_WARMUP steps, a snapshot of the whole training state (deep copies of
    G, D, EMA, both optimizers' state_dicts, the RNG states), RESUME_STEPS steps -> A; restore,
    the same steps on the same pre-fetched batches -> B. Max |A - B| per network, (a) with the
    default algorithms (cudnn.benchmark as the trainer), (b) with
    torch.use_deterministic_algorithms(True) (CUBLAS_WORKSPACE_CONFIG set before CUDA starts);
    where (b) raises for an op without a deterministic kernel, which op, and (b) again with
    warn_only=True (every such op, and what it gives). Passes when (a) is within
    RESUME_TOLERANCE (on the CPU: bitwise), and the bf16 EMA copy runs the class's forward in
    fp32 (P1)."""
    cuda = ctx.device == "cuda"
    if cuda:  # read when cuBLAS starts: before anything touches CUDA in this process
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    from accelerate.state import AcceleratorState

    from trainer.config import load_config
    from trainer.data import TripletLoader

    crop, batch_size = (32, 2) if ctx.tiny else (128, 4)
    warmup, steps = RESUME_WARMUP, RESUME_STEPS
    cfg = load_config(DEMO, [f"data.shards={ctx.shards / 'small'}", f"data.crop_size={crop}",
                             f"data.batch_size={batch_size}", "data.backend=webdataset",
                             "model.ngf=16", "model.depth=3", "model.norm=group"])
    loader = TripletLoader(cfg.data, cfg.model.mode, "train", 0, 1, torch.device(ctx.device),
                           seed=0)
    stream = _endless(loader)
    batches = [next(stream) for _ in range(warmup + steps)]  # the same data for every run
    del stream, loader
    figures: dict = {"crop": crop, "batch": batch_size, "warmup_steps": warmup,
                     "steps_compared": steps, "ngf": 16, "depth": 3, "norm": "group",
                     "tolerance_max_rel": RESUME_TOLERANCE,
                     "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    try:
        for precision in ("bf16", "fp32"):
            with algorithms(False, False, cuda):
                diffs, p1 = resume_run(ctx, cfg, precision, batches, warmup, steps,
                                       p1=precision == "bf16")
            figures[precision] = {"default": diffs}
            if p1:
                figures["p1_ema_forward"] = p1
            worst = max(diffs[n]["max_rel"] for n in GATED)
            tol = RESUME_TOLERANCE[precision]
            ctx.check(f"{precision} default: max relative difference <= {tol:g} (G, D, G_ema)",
                      worst <= tol, {n: f"{diffs[n]['max_rel']:.3g}" for n in GATED})
            if not cuda:  # the repo's claim on the CPU
                ctx.check(f"{precision} default: bitwise equal on the CPU",
                          all(diffs[n]["bitwise"] for n in diffs),
                          {n: diffs[n]["max_abs"] for n in diffs})
            # (b) deterministic algorithms: reported, not a pass condition
            det: dict = {}
            try:
                with algorithms(True, False, cuda):
                    det["differences"], _ = resume_run(ctx, cfg, precision, batches, warmup,
                                                       steps)
                det["available"] = True
            except RuntimeError as e:
                if NONDETERMINISTIC not in str(e):
                    raise
                det["available"] = False
                det["raised_by"] = nondeterministic_op(str(e))
                with warnings.catch_warnings(record=True) as records, \
                        algorithms(True, True, cuda):
                    warnings.simplefilter("always")
                    det["warn_only_differences"], _ = resume_run(ctx, cfg, precision, batches,
                                                                 warmup, steps)
                det["ops_without_deterministic_kernel"] = sorted(
                    {nondeterministic_op(str(r.message)) for r in records
                     if NONDETERMINISTIC in str(r.message)})
            figures[precision]["deterministic"] = det
            print(f"{precision}: default {json.dumps(diffs)}\n  deterministic "
                  f"{json.dumps(det)}", flush=True)
    finally:
        AcceleratorState._reset_state(True)
    return figures


# ---------------------------------------------------------------------------------------------
# DALI.


def _dali_cfg(shards: Path, crop: int, batch: int, threads: int, backend: str = "dali",
              jitter: float = 0.0):
    from trainer.config import load_config

    return load_config(DEMO, [
        f"data.shards={shards}", f"data.backend={backend}", f"data.crop_size={crop}",
        f"data.batch_size={batch}", f"data.num_threads={threads}",
        f"data.brightness_jitter={jitter}"]).data


def _first_frames(cfg, device, augment: bool):
    import torch

    from trainer.data import TripletLoader

    loader = TripletLoader(cfg, "grey", "train", 0, 1, torch.device(device), seed=0,
                           shuffle=augment, augment=augment)
    source = loader._make_source()  # DALI or webdataset, as data.backend says
    frames, keys, _ = source.next()
    return frames, keys, source


def dali(ctx: Context) -> dict:
    import torch

    from bench.step import _device, _sync
    from trainer.data import TripletLoader, dali_available

    if not dali_available():
        raise Skip("DALI absent (nvidia-dali-cuda130 not installed: see docs/gpu-check.md)")
    import nvidia.dali

    large = ctx.shards / "large"
    crop, batch = (64, 4) if ctx.tiny else (480, 8)
    figures: dict = {"dali": nvidia.dali.__version__, "crop": crop, "batch": batch}

    # 1. mixed (GPU) decoding against the CPU pipeline: centre crops, then augmented with
    # the same seed (the random draws are CPU operators: the same crops, flips and gains).
    for augment in (False, True):
        cfg = _dali_cfg(large, crop, batch, 2, jitter=0.2 if augment else 0.0)
        gpu, gkeys, source = _first_frames(cfg, ctx.device, augment)
        cpu, ckeys, _ = _first_frames(cfg, "cpu", augment)
        label = "augmented" if augment else "centre"
        ctx.check(f"{label}: mixed output is uint8 [B,3,H,W,3] on {ctx.device}",
                  gpu.dtype == torch.uint8 and tuple(gpu.shape) == (batch, 3, crop, crop, 3)
                  and gpu.device.type == ctx.device, f"{gpu.dtype} {tuple(gpu.shape)} "
                  f"{gpu.device}")
        ctx.check(f"{label}: same samples", gkeys == ckeys, f"{gkeys[:3]} vs {ckeys[:3]}")
        delta = (gpu.cpu().int() - cpu.cpu().int()).abs()
        figures[f"{label}_max_abs_diff"] = int(delta.max())
        figures[f"{label}_mean_abs_diff"] = round(float(delta.float().mean()), 4)
        ctx.check(f"{label}: mixed vs cpu decode |d| <= 3", int(delta.max()) <= 3, int(delta.max()))
        if not augment:
            figures["exec_dynamic"] = str(getattr(source.pipe, "exec_dynamic", "unknown"))
            wcfg = _dali_cfg(large, crop, batch, 2, backend="webdataset")
            wds, _, _ = _first_frames(wcfg, "cpu", False)
            figures["centre_vs_webdataset_max_abs_diff"] = int(
                (gpu.cpu().int() - wds.int()).abs().max())
        del source

    # 2. DALI checkpoint on the GPU: the position after 2 batches, restored in a new loader.
    ccrop, cbatch = (32, 2) if ctx.tiny else (128, 4)
    cfg = _dali_cfg(large, ccrop, cbatch, 2)

    def loader():
        return TripletLoader(cfg, "grey", "train", 0, 1, torch.device(ctx.device), seed=3)

    first = loader()
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(2)]
    second = loader()
    second.load_state_dict(state)
    resumed = list(zip(range(2), iter(second)))
    same_keys = [b.keys for b in expected] == [b.keys for _, b in resumed]
    diff = max(float((a.cond - b.cond).abs().max()) for a, (_, b) in zip(expected, resumed))
    ctx.check("checkpoint: the same next samples after restore", same_keys,
              f"{[b.keys for b in expected]} vs {[b.keys for _, b in resumed]}")
    ctx.check("checkpoint: the same pixels (|d cond| <= 1e-3)", diff <= 1e-3, diff)
    figures["checkpoint_max_abs_diff_cond"] = diff
    del first, second

    # 3. throughput at the training shape through TripletLoader (decode + Lab on the device).
    n = 6 if ctx.tiny else 50
    for threads in (2, 8):
        cfg = _dali_cfg(large, crop, batch, threads, jitter=0.1)
        tl = TripletLoader(cfg, "grey", "train", 0, 1, torch.device(ctx.device), seed=0)
        stream = _endless(tl)
        for _ in range(3):
            next(stream)
        _sync(_device(ctx.device))
        t0 = time.perf_counter()
        for _ in range(n):
            next(stream)
        _sync(_device(ctx.device))
        dt = time.perf_counter() - t0
        figures[f"threads{threads}_batches_per_s"] = round(n / dt, 2)
        figures[f"threads{threads}_triplets_per_s"] = round(n * batch / dt, 1)
        del tl, stream
    figures["throughput_note"] = (f"{n} batches after 3 warm-up, synthetic {crop}-crop JPEG "
                                  "triplets, epochs of few batches (pipeline reset included)")
    return figures


def _endless(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------------------------------------
# Trainer end to end through `accelerate launch`.


TRAIN_PLANS = {
    # precision: (launch file, first steps, resumed to, checkpoint/val/image interval)
    "bf16": ("launch/multi_gpu.yaml", 60, 90, 30),
    "fp16": ("launch/multi_gpu.yaml", 20, 40, 10),
    "deepspeed": ("launch/deepspeed_zero2.yaml", 20, 30, 10),
}


def train_commands(plan: str, shards: Path, runs_dir: Path,
                   cpu: bool = False) -> tuple[list[str], list[str]]:
    """The two launches of a trainer stage: `plan` steps from scratch, then the resume to
    more steps. `cpu`: the same without GPUs (tests)."""
    launch, steps, more, every = TRAIN_PLANS[plan]
    precision = "bf16" if plan == "bf16" else "fp16"
    overrides = [
        f"runs_dir={runs_dir}", f"name=gpu_{plan}", f"data.shards={shards}",
        "data.num_threads=2", f"train.mixed_precision={'no' if cpu else precision}",
        f"train.checkpoint_every={every}", f"train.val_every={every}",
        f"train.image_every={every}", "train.log_every=10",
    ]
    if plan == "bf16":
        overrides += ["train.channels_last=true", "model.norm=batch"]
    head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch,
            "--num_processes", "1", "trainer/main.py", "--config", "configs/demo.yaml"]
    return ([*head, "--no-resume", *overrides, f"train.max_steps={steps}"],
            [*head, *overrides, f"train.max_steps={more}"])


def _run_logged(argv: list[str], log: Path, env: dict) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    print(f"$ {' '.join(argv)}\n... rc {proc.returncode}, {time.perf_counter() - t0:.1f} s",
          flush=True)
    print("\n".join(proc.stdout.splitlines()[-25:]), flush=True)
    return proc.returncode, proc.stdout, time.perf_counter() - t0


def nonfinite_values(records: list[dict]) -> list[str]:
    """The non-finite numeric values of metrics.jsonl records, as "step S: name"."""
    return [f"step {r.get('step')}: {k}" for r in records for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)]


def tb_summary(tb_dir: Path) -> dict:
    """Last values of the Timing/ and Skipped/ scalars, and the image tags, of a run's
    TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict = {"scalars": {}, "images": []}
    for events in sorted(tb_dir.glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 1})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            if tag.startswith(("Timing/", "Skipped/")):
                values = acc.Scalars(tag)
                out["scalars"][tag] = {"last": values[-1].value, "max": max(
                    v.value for v in values), "step": values[-1].step}
        out["images"] += [t for t in tags.get("images", []) if t not in out["images"]]
    return out


def train_stage(ctx: Context, plan: str) -> dict:
    if plan == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise Skip("deepspeed absent")
    runs = ctx.work / "runs"
    first, second = train_commands(plan, ctx.shards / "small", runs, cpu=ctx.device == "cpu")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    figures: dict = {}
    run_dir = runs / f"gpu_{plan}"
    rc, out, dt = _run_logged(first, ctx.work / f"{plan}_first.log", env)
    figures["first_rc"], figures["first_s"] = rc, round(dt, 1)
    if not ctx.check("first launch exits 0", rc == 0, rc):
        return figures
    figures["data_backend"] = "dali" if "backend dali" in out else (
        "webdataset" if "backend webdataset" in out else "unknown")
    rc, out, dt = _run_logged(second, ctx.work / f"{plan}_resume.log", env)
    figures["resume_rc"], figures["resume_s"] = rc, round(dt, 1)
    ctx.check("resume launch exits 0", rc == 0, rc)
    _, steps, more, _ = TRAIN_PLANS[plan]
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    ctx.check(f"resume says 'resumed from ... step {steps}'",
              any(f"step {steps}" in line for line in resumed), resumed[:1])
    metrics = run_dir / "metrics.jsonl"
    if ctx.check("metrics.jsonl written", metrics.is_file(), metrics):
        records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        n, bad = len(records), nonfinite_values(records)
        figures["validations"] = n
        figures["last_validation"] = records[-1] if records else None
        ctx.check("validation metrics finite", n > 0 and not bad, bad[:5] or f"{n} records")
        ctx.check(f"validated at step {more}", any(r.get("step") == more for r in records),
                  [r.get("step") for r in records])
    export = run_dir / "export" / "generator.safetensors"
    ctx.check("export exists", export.is_file(), export)
    ctx.check("COMPLETE written", (run_dir / "COMPLETE").is_file())
    try:
        tb = tb_summary(run_dir / "tb")
        figures["tensorboard"] = tb
        ctx.check("images logged", any(t.startswith("Images/") for t in tb["images"]),
                  tb["images"])
    except ImportError as e:
        figures["tensorboard"] = f"not read: {e}"
    return figures


# ---------------------------------------------------------------------------------------------
# train_step at the real shape.


def step_480(ctx: Context) -> dict:
    """bench.step's own build (`build_ours`: the first seed's settings, ngf 64, depth 5) at
    480x480, batch 8, bf16, eager, with channels_last off/on x cudnn.benchmark off/on;
    synthetic resident batches (loading is bench/data.py's business). bench/step.py has no
    cudnn.benchmark switch, hence the timing here."""
    import torch

    from bench.step import Variant, _device, _sync, build_ours

    size, batch, warm, steps = (32, 2, 1, 2) if ctx.tiny else (480, 8, 3, 15)
    device = _device(ctx.device)
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    figures: dict = {"size": size, "batch": batch, "precision": precision, "steps": steps}
    for channels_last in (False, True):
        v = Variant("ours", size, batch, precision, False, channels_last)
        step, params = build_ours(v, None, device, 2)
        figures["params"] = params
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for _ in range(warm):
                step()
            _sync(device)
            if ctx.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            key = f"channels_last={channels_last} cudnn.benchmark={benchmark}"
            ms = statistics.median(times) * 1000
            figures[key] = {
                "ms_per_step": round(ms, 2),
                "triplets_per_s": round(batch / (ms / 1000), 1),
                "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)
                if ctx.device == "cuda" else None,
            }
            ctx.check(f"{key}: finite step time", math.isfinite(ms) and ms > 0, ms)
        del step
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    return figures


# ---------------------------------------------------------------------------------------------
# Environment.


def package_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def env(ctx: Context) -> dict:
    import platform

    import torch

    figures: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    for name in ("nvidia-dali-cuda130", "accelerate", "torchmetrics", "kornia", "omegaconf",
                 "webdataset", "deepspeed", "tensorboard", "opencv-python-headless", "numpy"):
        figures[name] = package_version(name)
    try:
        import nvidia.dali

        figures["dali_import"] = nvidia.dali.__version__
    except Exception as e:  # absent, or there and broken: either way, say which
        figures["dali_import"] = f"absent ({type(e).__name__}: {e})"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10)
        figures["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        figures["nvidia_smi"] = f"unavailable: {e}"
    if ctx.device == "cuda":
        figures["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        figures["gpu"] = torch.cuda.get_device_name(0)
        figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        figures["bf16_supported"] = torch.cuda.is_bf16_supported()
        figures["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        ctx.check("CUDA available", torch.cuda.is_available())
        ctx.check("bf16 supported", torch.cuda.is_bf16_supported())
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        (a @ a).float().sum().item()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        figures["bf16_matmul_tflops"] = round(10 * 2 * 4096**3 / (time.perf_counter() - t0)
                                              / 1e12, 1)
    for module in ("omegaconf", "kornia", "accelerate", "torchmetrics"):
        try:
            __import__(module)
            ok, detail = True, ""
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        ctx.check(f"{module} imports (the trainer needs it)", ok, detail)
    return figures


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "env": env,
    "dali": dali,
    "census_fp32": lambda ctx: census(ctx, "fp32"),
    "census_bf16": lambda ctx: census(ctx, "bf16"),
    "resume_exactness": resume_exactness,
    "train_bf16": lambda ctx: train_stage(ctx, "bf16"),
    "train_fp16": lambda ctx: train_stage(ctx, "fp16"),
    "step_480": step_480,
    "deepspeed": lambda ctx: train_stage(ctx, "deepspeed"),
}


def run_stage(name: str, ctx: Context) -> dict:
    """Run one stage in this process: {"status": pass|fail|skip, "figures", "checks",
    "reason"}."""
    try:
        figures = RUNNERS[name](ctx)
        failed = [c["name"] for c in ctx.checks if not c["ok"]]
        status, reason = ("fail", "failed: " + "; ".join(failed)) if failed else ("pass", "")
    except Skip as e:
        figures, status, reason = {}, "skip", str(e)
    except Exception as e:
        traceback.print_exc()
        figures, status = {}, "fail"
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return {"status": status, "reason": reason, "figures": figures, "checks": ctx.checks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_stages", description=__doc__)
    p.add_argument("stage", choices=list(RUNNERS))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--shards", type=Path, required=True, help="holds small/ and large/")
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU tests)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.work, args.shards, args.device, args.tiny)
    result = run_stage(args.stage, ctx)
    args.result.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["status"] != "fail" else 1


if __name__ == "__main__":
    sys.exit(main())
