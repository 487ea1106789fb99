"""Helpers shared by bench/step.py and bench/scaling.py: machine facts, memory, statistics."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines()
    return names[0] if out.returncode == 0 and names else None


def machine() -> dict:
    """What the figures were measured on (no torch import: callers may set threads first)."""
    flags = cpu_flags()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "gpu": gpu_name(),
        "loadavg": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# ---------------------------------------------------------------------------------------------
# Memory of this process (Linux /proc): resident set now, and its peak since the last reset.


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def peak_rss_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"
