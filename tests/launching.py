"""Starting the trainer the way users do: `accelerate launch` with CPU ranks on gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
# Tiny settings so a step takes a fraction of a second on 2 cores.
TINY = ["data.crop_size=32", "data.batch_size=2", "model.ngf=8", "model.ndf=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(*args: str, processes: int = 2) -> list[str]:
    mode = "--multi_gpu" if processes > 1 else "--cpu"  # --multi_gpu needs 2+ processes
    return [sys.executable, "-m", "accelerate.commands.launch", mode,
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def launch_env(**extra: str) -> dict[str, str]:
    """CPU ranks, also on a GPU host: ACCELERATE_USE_CPU for Accelerate, and no visible GPU
    for everything that asks torch.cuda (precision `auto`, DeepSpeed's backend choice)."""
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def launch(*args: str, processes: int = 2, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(*args, processes=processes), capture_output=True,
                          text=True, cwd=ROOT, env=launch_env(**env), timeout=timeout)


def popen(*args: str, processes: int = 2, **env) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd(*args, processes=processes), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=launch_env(**env), start_new_session=True)
