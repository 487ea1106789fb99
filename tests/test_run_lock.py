"""The run directory lock (trainer/run_lock.py) with real processes: holders on this host are
judged by their process, holders on another host by their heartbeat."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.run_lock import RunLock, RunLocked, _process_start

ROOT = Path(__file__).parent.parent


def foreign_lock(run: Path, age_s: float = 0.0) -> Path:
    """A LOCK written by a process of another host, last refreshed `age_s` ago."""
    lock = run / "LOCK"
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242,
                                "started": "2026-01-01T00:00:00+00:00"}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_the_holder_refreshes_its_heartbeat_and_releases(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    record = json.loads((tmp_path / "LOCK").read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    first = (tmp_path / "LOCK").stat().st_mtime_ns
    time.sleep(0.3)
    assert (tmp_path / "LOCK").stat().st_mtime_ns > first
    with pytest.raises(RunLocked, match="which is alive"):  # this very process holds it
        RunLock(tmp_path).acquire()
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no LOCK, no leftovers


def test_a_lock_of_another_host_with_an_old_heartbeat_is_taken_over(tmp_path, caplog):
    foreign_lock(tmp_path, age_s=30)
    t0 = time.monotonic()
    with RunLock(tmp_path, stale_s=5):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 2
    assert "taking over the lock of host node-elsewhere pid 4242" in caplog.text
    assert "no heartbeat for 30 s" in caplog.text


def test_a_young_lock_of_another_host_is_watched(tmp_path):
    # refreshed by a live holder: refused
    lock = foreign_lock(tmp_path)
    beat = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "while True:\n    os.utime(sys.argv[1]); time.sleep(0.1)\n"), str(lock)])
    try:
        t0 = time.monotonic()
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path, stale_s=10).acquire()
        assert time.monotonic() - t0 < 5
    finally:
        beat.kill()
        beat.wait()
    assert str(err.value).startswith(f"{lock}: the run directory is in use by host "
                                     "node-elsewhere pid 4242 started 2026-01-01")
    # not refreshed (its holder was killed a moment ago): taken over after stale_s
    foreign_lock(tmp_path)
    t0 = time.monotonic()
    with RunLock(tmp_path, stale_s=1.5):
        assert 1.5 <= time.monotonic() - t0 < 5


def test_a_reused_pid_is_not_the_holder(tmp_path, caplog):
    # this host, a live pid (ours), but another process start time: the holder is gone
    (tmp_path / "LOCK").write_text(json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1",
        "started": "2026-01-01T00:00:00+00:00"}))
    with RunLock(tmp_path):
        pass
    assert "its process is gone" in caplog.text


SIGTERM_HOLDER = """
import sys, time
from trainer.main import exit_on_sigterm
from trainer.run_lock import RunLock
with exit_on_sigterm(), RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def test_sigterm_releases_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", SIGTERM_HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline() == "held\n"
    assert (tmp_path / "LOCK").exists()
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=30) == 128 + signal.SIGTERM
    assert not (tmp_path / "LOCK").exists()


def test_a_killed_holder_not_yet_reaped_is_not_alive(tmp_path):
    """A SIGKILLed rank whose parent died waits for a reaper that a container's init may never
    be: as a zombie it still answers kill(pid, 0), but it holds nothing."""
    holder = subprocess.Popen(["sleep", "60"])
    lock = tmp_path / "LOCK"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                "pid_start": _process_start(holder.pid),
                                "started": "2026-01-01T00:00:00+00:00"}))
    holder.kill()
    deadline = time.time() + 10
    while Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(holder.pid, 0)  # a zombie: still there for kill(), not reaped yet
    try:
        taker = RunLock(tmp_path)
        taker.acquire()
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        taker.release()
    finally:
        holder.wait()
