"""Helpers shared by the benchmarks (and gpu/ stages): torch threads, machine facts, memory,
statistics, the device. No torch import at module level: a benchmark sets OMP_NUM_THREADS
from its arguments before torch loads (`set_threads_from_argv`), and imports this first."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path


def threads_from_argv(argv: list[str], flag: str, default: int = 1) -> int:
    """The value of `flag N` or `flag=N` in argv, read before argparse runs."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith(flag + "="):
            return int(arg.split("=", 1)[1])
    return default


def set_threads_from_argv(flag: str) -> None:
    """OMP_NUM_THREADS from the command line's `flag`: it only takes effect if set before
    torch is imported, so a benchmark calls this above its torch import."""
    os.environ["OMP_NUM_THREADS"] = str(threads_from_argv(sys.argv[1:], flag))


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
# CPU time of this process and its children (Linux /proc): what other load on a host barely
# changes, unlike wall-clock time.

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


# ---------------------------------------------------------------------------------------------


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


# ---------------------------------------------------------------------------------------------
# The device (torch imported when called: see the module docstring).


def torch_device(name: str):
    """The first GPU for "cuda", else the CPU."""
    import torch

    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def sync(device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
