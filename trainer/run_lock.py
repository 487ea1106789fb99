"""One set of ranks per run directory: a lock file that the main process takes before anything
of the run is written, and releases when it exits.

Without it a requeued job, or a user rerunning the command, can start a second set of ranks on
a run whose first set is still alive (killing only the launcher orphans its ranks, which train
on), and both write the same checkpoints.

    <run>/LOCK    JSON: host, pid (and its start time), start date, Slurm job; mtime: heartbeat

Taking it: the record is written to a private file, then hard-linked to LOCK; the link fails
when LOCK exists, atomically, also on NFS. A LOCK whose holder is gone is taken over with a
warning:
- same host: the holder's process no longer exists (pid and process start time, so that a
  reused pid does not count as the holder);
- another host: its heartbeat (the mtime, refreshed every `heartbeat_s` by a daemon thread of
  the holder) is watched: refreshed (changed at all), the holder lives and the start is
  refused; unchanged for `stale_s` of this host's monotonic clock, it is taken over. The
  mtime is never compared with this host's clock (the holder's host, or the file server,
  may run fast or slow), so a start on another host waits `stale_s` for every lock it finds.
- a record this host cannot check by its process (not UTF-8, not a JSON object, no valid pid:
  pid 0 or a negative one would signal a process group) is judged like another host's, by
  its heartbeat; it never crashes the start.
Anything else is refused with RunLocked, naming the file and the holder. The other ranks wait
for this decision in a collective (train.dist_timeout_min): a start given that wait refuses at
once, saying so, a lock it could only judge by watching past half of it. The lock is released
on a normal exit and on an error; a process killed outright (SIGKILL, a second SIGTERM that
aborts) leaves it behind, and the next start takes it over as above.

A holder whose heartbeat could not be refreshed for `stale_s` (a storage stall) may have been
taken over meanwhile: when its heartbeat finds the lock gone or another's, it logs an error and
asks its own process to stop (SIGTERM: the trainer's stop path, a checkpoint and exit), so that
two sets of ranks never go on training the same run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"
HEARTBEAT_S = 10.0  # how often the holder refreshes the lock's mtime
STALE_S = 60.0  # a lock of another host not refreshed for this long is abandoned
POLL_S = 0.5  # how often a starter looks at another host's heartbeat while it waits
RECORD_MAX = 4096  # a record is ~200 bytes: a longer LOCK is no record of this module's


class RunLocked(RuntimeError):
    """The run directory belongs to another live process; the message names it."""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3... of /proc/<pid>/stat (state first), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the name in (...) may hold spaces


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None where unknown. With the
    pid it identifies a process: a pid reused by another process has another start time."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22


def _alive(pid: int, start: str | None) -> bool:
    """Whether the process that wrote a lock record on this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):
        # Killed and not yet reaped (orphaned ranks wait for a reaper that a container's
        # init may never be): it holds nothing any more.
        return False
    now = fields[19] if fields else None
    return start is None or now is None or now == start


def _is_pid(value) -> bool:
    """Whether a record's pid can name one process: kill(0) and kill(-n) signal process
    groups (always "alive"), True is 1 to Python, and kill() overflows past 32 bits."""
    return type(value) is int and 0 < value < 2**31


def _parse(raw: bytes) -> dict:
    """The holder's record; for content that is none (not UTF-8, not a JSON object, too long)
    {"unreadable": its first bytes}. Never raises."""
    try:
        holder = json.loads(raw.decode("utf-8")) if len(raw) <= RECORD_MAX else None
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        holder = None
    return holder if isinstance(holder, dict) else {"unreadable": raw[:60]}


def _text(value) -> str:
    """A record's field for a one-line message."""
    text = str(value)
    return (text if text.isprintable() else repr(text))[:80]


def describe(holder: dict) -> str:
    if "unreadable" in holder:
        return f"an unreadable lock record ({_text(holder['unreadable'])})"
    job = f", Slurm job {_text(holder['slurm_job'])}" if holder.get("slurm_job") else ""
    return (f"host {_text(holder.get('host'))} pid {_text(holder.get('pid'))} started "
            f"{_text(holder.get('started'))}{job}")


class RunLock:
    """`ranks_wait_s`: how long the other ranks wait for this start's decision (the process
    group's timeout, train.dist_timeout_min); `acquire` takes at most half of it, as the ranks
    do not all begin to wait at the same instant."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, ranks_wait_s: float = math.inf):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.wait_s = ranks_wait_s / 2
        self.record: dict | None = None
        self._raw: bytes | None = None  # the record as written: compared byte for byte
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and releasing ---------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock (waiting at most `stale_s` on another host's heartbeat, and never
        past `wait_s`); raises RunLocked when a live process holds it, or when telling would
        take longer."""
        pid = os.getpid()
        self.record = {
            "host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        self._raw = (json.dumps(self.record) + "\n").encode()
        mine = self.path.with_name(f"{LOCK_NAME}.{self.record['host']}.{pid}.partial")
        mine.write_bytes(self._raw)
        deadline = time.monotonic() + self.wait_s
        try:
            while True:
                try:
                    os.link(mine, self.path)  # fails if LOCK exists: the atomic test-and-set
                    break
                except FileExistsError:
                    self._remove_if_abandoned(deadline)  # raises RunLocked for a live holder
        finally:
            mine.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._raw is not None and self._read()[0] == self._raw:
            self.path.unlink(missing_ok=True)
        self.record = self._raw = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the holder's side ------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                raw, _ = self._read()
                if raw != self._raw:
                    log.error("%s: no longer this process's lock (now: %s): another start took "
                              "it over (this holder's heartbeat stalled?); stopping",
                              self.path, "none" if raw is None else describe(_parse(raw)))
                    self._lost()
                    return
                os.utime(self.path)
            except OSError as e:  # a storage hiccup: the next beat tries again
                log.warning("%s: heartbeat failed: %s", self.path, e)

    @staticmethod
    def _lost() -> None:
        """The lock is someone else's now: stop this process the way a scheduler would."""
        os.kill(os.getpid(), signal.SIGTERM)

    # -- a starter's side -------------------------------------------------------------------

    def _read(self) -> tuple[bytes | None, float]:
        """The lock's content (its first RECORD_MAX + 1 bytes) and mtime; (None, 0) when there
        is no lock. Opening the file before its stat revalidates NFS's cached attributes
        (close-to-open)."""
        try:
            with open(self.path, "rb") as f:
                raw, mtime = f.read(RECORD_MAX + 1), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, 0.0
        return raw, mtime

    def _remove_if_abandoned(self, deadline: float) -> None:
        try:
            raw, mtime = self._read()
        except OSError as e:  # a directory, no permission: nothing this start can judge
            raise RunLocked(f"{self.path}: cannot read this run lock ({e.strerror}); if no other "
                            f"run uses {self.path.parent}, delete it") from None
        if raw is None:
            return  # released meanwhile: try again
        holder = _parse(raw)
        if holder.get("host") == socket.gethostname() and _is_pid(holder.get("pid")):
            if _alive(holder["pid"], holder.get("pid_start")):
                self._refuse(holder, "is alive")
            reason = "its process is gone"
        else:  # another host's, or a record no process of this host can be checked against
            reason = self._wait_for_heartbeat(holder, raw, mtime, deadline)
            if reason is None:
                return
        self._remove(raw, holder, reason)

    def _wait_for_heartbeat(self, holder: dict, raw: bytes, mtime: float,
                            deadline: float) -> str | None:
        """Watch the lock until it is refreshed (refused) or has not been for `stale_s` of
        watching; returns the reason to take it over, None when the lock changed hands
        meanwhile (look again). Only a change of the mtime counts, never its age: the other
        host's clock is not this one's. Refused at once when the watch would end after
        `deadline`."""
        watched = time.monotonic()
        if watched + self.stale_s > deadline:
            raise RunLocked(
                f"{self.path}: the run directory is held by {describe(holder)}; telling whether "
                f"it is abandoned takes {self.stale_s:g} s of watching its heartbeat, but this "
                f"start may take only {max(0.0, deadline - watched):.0f} s more (half of "
                "train.dist_timeout_min, which the other ranks wait): if its holder is gone, "
                "delete this file; else wait for it to end, or set train.dist_timeout_min >= "
                f"{2 * self.stale_s / 60:g}")
        while True:
            silent = time.monotonic() - watched
            if silent > self.stale_s:
                return (f"its heartbeat did not change in {silent:.0f} s of watching "
                        f"(> {self.stale_s:g} s)")
            time.sleep(POLL_S)
            now, now_mtime = self._read()
            if now != raw:
                return None
            if now_mtime != mtime:
                self._refuse(holder, "refreshed its heartbeat while this start waited")

    def _remove(self, raw: bytes, holder: dict, reason: str) -> None:
        """Move an abandoned lock aside. rename is atomic: of several starters that found the
        same abandoned lock one moves it; one that moved a newer lock taken meanwhile puts it
        back and tries again like the others."""
        aside = self.path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = aside.read_bytes()[:RECORD_MAX + 1]
        except OSError:
            moved = None
        if moved != raw:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("%s: taking over the lock of %s: %s", self.path, describe(holder),
                        reason)
        aside.unlink(missing_ok=True)

    def _refuse(self, holder: dict, state: str) -> None:
        raise RunLocked(
            f"{self.path}: the run directory is in use by {describe(holder)}, which {state}; "
            "wait for it to end or stop it (if you know it is gone, delete this file)"
        )


def take_run_lock(accelerator, run_dir: Path, ranks_wait_s: float):
    """The main process locks the run directory (RunLock) and tells the other ranks
    whether it could: all go on, or all raise RunLocked. Returns the lock (main process) or
    None (other ranks). The other ranks wait in the broadcast for at most `ranks_wait_s` (the
    process-group timeout): the lock decides within that, or refuses saying why."""
    from accelerate.utils import broadcast_object_list

    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir, ranks_wait_s=ranks_wait_s)
            lock.acquire()
        except (RunLocked, OSError) as e:
            lock, refusal = None, str(e)
    refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise RunLocked(refusal)
    return lock
