"""The stages of `make gpu-check` (gpu/check.py runs each in a process of its own, under its
own time limit, and writes the report). One stage by hand:

    python -m gpu.stages STAGE --work DIR --result RESULT.json [--device cuda]

A stage returns its figures and records named checks; a failed check fails the stage, an
exception fails it too (with the traceback), `Skip` skips it (a package the host lacks).
Everything here also runs on CPU (`--device cpu`, tiny shapes: tests/test_gpu_check.py), where
the sync census counts nothing: torch's sync debug mode exists on CUDA only.

The stages themselves: gpu/census.py, gpu/resume.py, gpu/dali_stage.py, gpu/train.py; `env`
here. Their shards: gpu/shards.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpu.census import census
from gpu.context import Context, Skip
from gpu.dali_stage import dali
from gpu.resume import resume_exactness
from gpu.train import step_480, train_stage


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # the stage's own time limit (its process is killed after it)
    what: str
    optional: bool = False  # started only when its whole budget is left


# The order they run in, and their limits: 480 s in all, the install step included
# (gpu/check.py: INSTALL_BUDGET_S); docs/gpu-check.md has the same table.
STAGES = [
    Stage("env", 20, "versions (torch, CUDA, cuDNN, NCCL, driver, DALI), GPU, a bf16 matmul"),
    Stage("dali", 60, "DALI mixed vs CPU decode (|d| <= 3), checkpoint round trip on the GPU, "
                      "crop-480 throughput with num_threads 2 and 8"),
    Stage("census_fp32", 25, "host syncs per train_step under sync debug mode, grey + line art"),
    Stage("census_bf16", 25, "the same under bf16 autocast"),
    Stage("resume_exactness", 40, "in-memory snapshot after 3 steps, 5 more, restore, the same 5 "
                                  "again: max |A-B| per network, bf16 and fp32, default and "
                                  "deterministic algorithms; the bf16 EMA copy's forward"),
    Stage("train_bf16", 100, "accelerate launch (multi_gpu.yaml, NCCL, world 1) bf16 60 steps "
                             "with checkpoints, validation, images; resume to 90"),
    Stage("train_fp16", 55, "the same in fp16: 20 steps, resume to 40 (GradScaler state)"),
    Stage("step_480", 55, "train_step at 480x480 batch 8 bf16 (bench.step's build_ours): "
                          "channels_last x cudnn.benchmark, step time and peak memory"),
    Stage("deepspeed", 40, "ZeRO-2 fp16 20 steps, save, resume to 30 (if deepspeed imports)",
          optional=True),
]
BY_NAME = {s.name: s for s in STAGES}


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
    p = argparse.ArgumentParser(prog="python -m gpu.stages", description=__doc__)
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
