"""The trainer stages of `make gpu-check` (train_bf16, train_fp16, deepspeed: `accelerate
launch` of trainer/main.py, then its resume) and step_480 (train_step at the real shape)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpu.context import ROOT, Context, Skip

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


def run_logged(argv: list[str], log: Path, env: dict) -> tuple[int, str, float]:
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
    rc, out, dt = run_logged(first, ctx.work / f"{plan}_first.log", env)
    figures["first_rc"], figures["first_s"] = rc, round(dt, 1)
    if not ctx.check("first launch exits 0", rc == 0, rc):
        return figures
    figures["data_backend"] = "dali" if "backend dali" in out else (
        "webdataset" if "backend webdataset" in out else "unknown")
    rc, out, dt = run_logged(second, ctx.work / f"{plan}_resume.log", env)
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
    """bench.step's own build (`build_ours`: the 3-frame GAN's settings, ngf 64, depth 5) at
    480x480, batch 8, bf16, eager, with channels_last off/on x cudnn.benchmark off/on;
    synthetic resident batches (loading is bench/data.py's business). bench/step.py has no
    cudnn.benchmark switch, hence the timing here."""
    import torch

    from bench.common import sync, torch_device
    from bench.step_variants import Variant, build_ours

    size, batch, warm, steps = (32, 2, 1, 2) if ctx.tiny else (480, 8, 3, 15)
    device = torch_device(ctx.device)
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
            sync(device)
            if ctx.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                sync(device)
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

