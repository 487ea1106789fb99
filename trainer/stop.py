"""Stopping cleanly on request: SIGTERM, SIGINT, SIGUSR1, or a stop file.

Slurm announces preemption and time limits with a signal (see slurm/train.sbatch, which
touches the file named by TRICOLOR_STOP_FILE), and a signal may reach one rank only. So each
rank records the request, and at agreement steps the ranks agree through a reduced flag: all
save a checkpoint at the same step and exit 0, and no rank waits alone in a collective. An
agreement is a host sync (and a stat of the stop file, metadata load on shared storage), so
the loop (trainer/train.py) agrees every `train.stop_check_every` steps and at every
checkpoint step and the last step, not at every step: a request takes effect at the next
of those.
A second signal aborts at once, unless it arrives within `DUPLICATE_S` of the first: Slurm
delivers SIGTERM twice within a millisecond (from slurmstepd and, forwarded, from torch's
elastic agent), and that must count as one request, not as "abort".
Outside the loop (start-up, the run lock) `exit_on_sigterm` makes SIGTERM exit through Python.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_S = 1.0  # a repeat within this many seconds is the same request, delivered twice


class StopRequest:
    def __init__(self, stop_file: str | None = None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.requested = False
        self._first_at = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested:
            if now - self._first_at < DUPLICATE_S:
                return  # the same request, delivered twice
            log.warning("second %s: aborting at once", signal.Signals(signum).name)
            for s in SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested, self._first_at = True, now
        log.warning("received %s: saving a checkpoint at the next agreement step, then exiting "
                    "(send it again to abort at once)", signal.Signals(signum).name)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was asked to stop. A collective: call it on
        every rank at the same steps. Reads the stop file (one stat) and waits for the
        device (one `.item()`)."""
        local = self.requested or bool(self.stop_file and self.stop_file.exists())
        flag = torch.full((), float(local), device=device)  # a fill: no host-to-device copy
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stop_file_from_env() -> str | None:
    return os.environ.get("TRICOLOR_STOP_FILE") or None


@contextlib.contextmanager
def exit_on_sigterm():
    """SIGTERM outside the training loop (which has its own handlers, StopRequest) exits
    through Python, so that `finally` blocks run and the run lock is released."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
