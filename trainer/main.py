"""Entry point: `accelerate launch trainer/main.py --config configs/X.yaml [key=value ...]`.

Parses and checks the config (before any process group or data is touched), sets up the
Accelerator, checks the world size, writes the resolved config into the run directory and
trains. On a CPU host: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu
--num_processes 2 trainer/main.py ...` (plain `--cpu --num_processes 2` starts one process).
The launch config picks the backend: `--config_file launch/deepspeed_zero2.yaml` trains G and
D as DeepSpeed ZeRO engines (without ACCELERATE_USE_CPU, also on CPU); anything else is DDP.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
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
    return parser.parse_args(argv)


def precision(cfg, accelerator_cls) -> str:
    """`auto`: bf16 on GPUs that support it, fp32 elsewhere (CPU bf16 is slow, not wrong)."""
    import torch

    choice = cfg.train.mixed_precision.value
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def validation_table(metrics: dict[str, float]) -> str:
    """The final validation as a small table: value and, where there is one, the floor
    (the ground truth's own value: real video is not perfectly consistent either)."""
    lines = ["validation (EMA generator, val split)", f"{'metric':<8} {'value':>10} {'floor':>10}"]
    for name, value in metrics.items():
        if name.endswith("_truth") or name.endswith("_excess"):
            continue
        floor = metrics.get(f"{name}_truth")
        floor_text = f"{floor:>10.4g}" if floor is not None else f"{'':>10}"
        lines.append(f"{name:<8} {value:>10.4g} {floor_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides, require_data=not args.dry_run)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from trainer.backend import LaunchConfigError, make_accelerator
    from trainer.train import train

    try:
        accelerator = make_accelerator(cfg, precision(cfg, Accelerator))
    except LaunchConfigError as e:
        print(f"launch config error: {e}", file=sys.stderr)
        return 1
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
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = run_dir / "checkpoints"
        if args.no_resume and old.exists():
            aside = run_dir / f"checkpoints.before-{int(time.time())}"
            old.rename(aside)
            logging.getLogger(__name__).warning("--no-resume: moved %s to %s", old, aside)
        (run_dir / "COMPLETE").unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(
            f"# git commit {git_commit()}\n" + OmegaConf.to_yaml(cfg))
    accelerator.wait_for_everyone()
    from trainer.checkpoint import CheckpointError

    explicit = Path(cfg.resume_from) if cfg.resume_from else None
    try:
        final = train(cfg, accelerator, run_dir, explicit, allow_resume=not args.no_resume)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 1
    if final is None:  # stopped on request, checkpoint saved: a requeued job resumes
        accelerator.end_training()
        return 0
    if accelerator.is_main_process:
        (run_dir / "COMPLETE").write_text("done\n")
        if final:
            print(validation_table(final))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
