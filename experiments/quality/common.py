"""What every part of `make quality` uses: the repository root (commands run there), the log
line, and a command run with its output in a log file."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(cmd: list[str], log_path: Path, env: dict | None = None) -> float:
    """Run `cmd` with its output in `log_path`; seconds taken. Raises RuntimeError with the
    log's tail when it fails."""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}).returncode
    if rc:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"exit {rc}: {shlex.join(cmd[:4])} ... (log {log_path}):\n{tail}")
    return time.perf_counter() - t0
