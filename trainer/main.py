"""Entry point: `accelerate launch trainer/main.py --config configs/X.yaml [key=value ...]`.

Parses and checks the config (before any process group or data is touched), sets up the
Accelerator, checks the world size, locks the run directory (one set of ranks per run) and
trains; the run directory changes only once the launch is accepted (trainer/train.py:
start_run). Refusals print one line (`config error: ...`, `data error: ...`, `checkpoint
error: ...`, `run directory error: ...`, `training error: ...` for too many non-finite steps)
and exit 1. The process group is destroyed on every return, refusals included (they are agreed
across ranks); an unexpected exception propagates with the group left alive (see `main`).

On a CPU host: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu
--num_processes 2 trainer/main.py ...` (plain `--cpu --num_processes 2` starts one process).
The launch config picks the backend: `--config_file launch/deepspeed_zero2.yaml` trains G and
D as DeepSpeed ZeRO engines (without ACCELERATE_USE_CPU, also on CPU); anything else is DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer/main.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--dry-run", action="store_true", help="print the config and exit")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over even if the run directory holds checkpoints "
                             "(they are moved aside, not deleted)")
    return parser.parse_intermixed_args(argv)  # flags may come between the overrides


def fail(accelerator, kind: str, error: Exception) -> int:
    """One line naming the problem, exit status 1. The error was reached by every rank alike
    (the callers agree across ranks first), so the main process alone says it."""
    if accelerator.is_main_process:
        print(f"{kind} error: {error}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.config import ConfigError, check_fits, load_config

    try:
        cfg = load_config(args.config, args.overrides, require_data=not args.dry_run)
        if not args.dry_run:
            check_fits(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0

    from trainer.launch import LaunchConfigError, make_accelerator, precision

    try:
        accelerator = make_accelerator(cfg, precision(cfg))
    except LaunchConfigError as e:
        print(f"launch config error: {e}", file=sys.stderr)
        return 1
    status = setup_and_run(cfg, args, accelerator)
    # Every return, success or a refusal: a process group left alive makes PyTorch warn at
    # exit and NCCL may hang there with live communicators. The refusals are agreed across
    # ranks (CheckpointError, data and run-lock errors, FloatingPointError: the skip streak
    # comes from flags that are the same on every rank), so every rank gets here together.
    # Not on an unexpected exception (hence no `finally`): that rank may be alone while its
    # peers wait in a collective, and NCCL's destroy_process_group waits for pending work,
    # up to the process-group timeout; exiting at once lets the launcher end the others.
    # A no-op without a group.
    accelerator.end_training()
    return status


def setup_and_run(cfg, args, accelerator) -> int:
    """Everything after the Accelerator exists (and so the process group, if any)."""
    import torch
    from accelerate.utils import set_seed

    from trainer.run_lock import RunLocked, take_run_lock
    from trainer.stop import exit_on_sigterm

    if accelerator.device.type == "cuda":
        # Fixed shapes (one crop size and batch): cuDNN times its algorithms once per shape
        # and keeps the fastest (on against off: `make gpu-check`, stage step_480). The timed
        # choice may differ between runs: GPU runs are not bitwise reproducible anyway (atomic
        # adds in backward). Nothing to tune on a CPU.
        torch.backends.cudnn.benchmark = True
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        print(f"error: the launcher started {launched} processes but the Accelerator sees "
              f"{accelerator.num_processes}; on CPU set ACCELERATE_USE_CPU=true with "
              "--multi_gpu", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format=f"%(asctime)s [rank {accelerator.process_index}] %(name)s: %(message)s",
    )
    set_seed(cfg.train.seed, device_specific=True)  # per-rank seeds: different noise per rank
    run_dir = Path(cfg.runs_dir) / cfg.name
    created = not run_dir.exists()
    with exit_on_sigterm():
        try:
            lock = take_run_lock(accelerator, run_dir, cfg.train.dist_timeout_min * 60)
        except RunLocked as e:
            return fail(accelerator, "run directory", e)
        status = 1
        try:
            status = run(cfg, args, accelerator, run_dir)
            return status
        finally:
            if lock is not None:
                lock.release()
                if status != 0 and created:  # a refused first launch leaves no trace
                    with contextlib.suppress(OSError):
                        run_dir.rmdir()  # only if empty


def run(cfg, args, accelerator, run_dir: Path) -> int:
    """Train in a locked run directory; the exit status."""
    from shards.manifest import ManifestError
    from trainer.checkpoint import CheckpointError
    from trainer.data import NoSamplesError
    from trainer.run_log import validation_table
    from trainer.train import train

    explicit = Path(cfg.resume_from) if cfg.resume_from else None
    try:
        final = train(cfg, accelerator, run_dir, explicit, allow_resume=not args.no_resume)
    except CheckpointError as e:  # agreed across ranks by the checkpointer
        return fail(accelerator, "checkpoint", e)
    except (NoSamplesError, ManifestError) as e:  # raised on every rank alike (select_samples_once)
        return fail(accelerator, "data", e)
    except FloatingPointError as e:  # too many skipped steps: counted alike on every rank
        return fail(accelerator, "training", e)
    if final is None:  # stopped on request, checkpoint saved: a requeued job resumes
        return 0
    if accelerator.is_main_process:
        (run_dir / "COMPLETE").write_text("done\n")
        if final:
            print(validation_table(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
