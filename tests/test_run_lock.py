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


def test_a_lock_of_another_host_is_taken_over_once_watched_unchanged(tmp_path, caplog):
    """An old mtime alone proves nothing (the other host's clock may be behind): the lock is
    watched for stale_s of this host's monotonic clock, whatever its mtime says."""
    for age_s in (3600, -3600):  # written an hour ago, or an hour "from now"
        foreign_lock(tmp_path, age_s=age_s)
        t0 = time.monotonic()
        with RunLock(tmp_path, stale_s=1):
            assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
        assert 1 <= time.monotonic() - t0 < 4
    assert "taking over the lock of host node-elsewhere pid 4242" in caplog.text
    assert "its heartbeat did not change in 1 s of watching" in caplog.text


def test_a_live_holder_whose_clock_is_behind_is_refused(tmp_path):
    """Its heartbeat writes mtimes an hour in the past, but they change: the holder lives."""
    lock = foreign_lock(tmp_path, age_s=3600)
    beat = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "while True:\n"
        "    t = time.time() - 3600; os.utime(sys.argv[1], (t, t)); time.sleep(0.1)\n"),
        str(lock)])
    try:
        with pytest.raises(RunLocked, match="refreshed its heartbeat"):
            RunLock(tmp_path, stale_s=10).acquire()
    finally:
        beat.kill()
        beat.wait()


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
from trainer.stop import exit_on_sigterm
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


LOSING_HOLDER = """
import sys, time
from trainer.stop import exit_on_sigterm
from trainer.run_lock import RunLock
with exit_on_sigterm(), RunLock(sys.argv[1], heartbeat_s=0.1):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("taken", ["by another host", "removed"])
def test_a_holder_whose_lock_was_taken_stops(tmp_path, taken):
    """A holder whose heartbeat stalled (NFS) may have been taken over meanwhile: when its
    heartbeat sees the lock gone or another's, it stops itself through SIGTERM (the trainer's
    stop path) instead of training on beside the new owner, whose lock it leaves alone."""
    holder = subprocess.Popen([sys.executable, "-c", LOSING_HOLDER, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        lock = tmp_path / "LOCK"
        lock.unlink()
        if taken == "by another host":
            foreign_lock(tmp_path)
        assert holder.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        holder.kill()
        holder.wait()
    assert "no longer this process's lock" in holder.stderr.read()
    if taken == "by another host":
        assert json.loads(lock.read_text())["host"] == "node-elsewhere"
    else:
        assert not lock.exists()


def here(**record) -> bytes:
    """A LOCK record of this host."""
    return json.dumps({"host": socket.gethostname(), "started": "2026-01-01", **record}).encode()


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00 not UTF-8", b"[1, 2]", b"[" * 100_000, b"{" + b" " * 5000 + b"}",
    here(pid=0), here(pid=-1), here(pid=True), here(pid=2**80), here(pid="4242"),
], ids=["not-utf8", "not-an-object", "deep", "too-long", "pid-0", "pid-negative", "pid-true",
        "pid-huge", "pid-text"])
def test_a_lock_that_names_no_process_is_judged_by_its_heartbeat(tmp_path, caplog, content):
    """Content no process of this host can be checked against never crashes the start (a
    UnicodeDecodeError, a RecursionError, an OverflowError from kill()), never loops (a JSON
    list moved aside was put back and retried forever) nor counts as alive forever (kill(0, 0)
    signals this process group): unchanged for stale_s of watching, it is taken over."""
    lock = tmp_path / "LOCK"
    lock.write_bytes(content)
    t0 = time.monotonic()
    with RunLock(tmp_path, stale_s=0.5):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 5
    line = next(r.getMessage() for r in caplog.records if "taking over" in r.getMessage())
    assert line.startswith(f"{lock}: taking over the lock of ") and "\n" not in line
    assert "its heartbeat did not change" in line


def test_a_live_holder_with_an_unreadable_record_is_refused_in_one_line(tmp_path):
    lock = tmp_path / "LOCK"
    lock.write_bytes(b"\xff\xfe\x00 not UTF-8")
    beat = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "while True:\n    os.utime(sys.argv[1]); time.sleep(0.1)\n"), str(lock)])
    try:
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path, stale_s=10).acquire()
    finally:
        beat.kill()
        beat.wait()
    assert str(err.value).startswith(f"{lock}: the run directory is in use by an unreadable "
                                     "lock record (b'\\xff\\xfe\\x00 not UTF-8')")
    assert "delete this file" in str(err.value) and "\n" not in str(err.value)
    assert lock.read_bytes() == b"\xff\xfe\x00 not UTF-8"  # left as it was


def test_a_lock_that_cannot_be_read_is_refused_naming_it(tmp_path):
    (tmp_path / "LOCK").mkdir()  # also for root, whom no file mode stops from reading
    with pytest.raises(RunLocked, match=rf"^{tmp_path / 'LOCK'}: cannot read this run lock "
                                        rf"\(Is a directory\); if no other run uses {tmp_path}, "
                                        "delete it$"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / "LOCK").is_dir()


def test_the_decision_never_outlasts_the_other_ranks_wait(tmp_path):
    """The other ranks wait for the lock in a collective that times out: a lock that could
    only be judged by watching past half of that wait is refused at once, saying what to do."""
    lock = foreign_lock(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(RunLocked) as err:
        RunLock(tmp_path, ranks_wait_s=30).acquire()  # watching takes 60 s
    assert time.monotonic() - t0 < 10  # at once, not after watching
    assert str(err.value).startswith(f"{lock}: the run directory is held by host node-elsewhere "
                                     "pid 4242 started 2026-01-01")
    assert "takes 60 s of watching its heartbeat, but this start may take only 15 s more" \
        in str(err.value)
    assert "set train.dist_timeout_min >= 2" in str(err.value)


def test_a_lock_changing_hands_all_the_time_is_refused_within_the_wait(tmp_path):
    """Each watch ends when the lock changes hands, and the start looks again: without a
    bound on the whole decision that goes on for as long as the lock keeps changing."""
    churn = subprocess.Popen([sys.executable, "-c", (
        "import json, os, sys, time\n"
        "for pid in range(1000, 10**6):\n"
        "    tmp = sys.argv[1] + '.tmp'\n"
        "    open(tmp, 'w').write(json.dumps({'host': 'node-elsewhere', 'pid': pid}))\n"
        "    os.replace(tmp, sys.argv[1]); time.sleep(0.1)\n"), str(tmp_path / "LOCK")])
    try:
        while not (tmp_path / "LOCK").exists():
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(RunLocked, match="this start may take only"):
            RunLock(tmp_path, stale_s=1, ranks_wait_s=4).acquire()
        assert time.monotonic() - t0 < 4  # within the ranks' wait (it takes half, 2 s)
    finally:
        churn.kill()
        churn.wait()


@pytest.mark.slow
def test_two_ranks_facing_an_unreadable_lock_with_a_short_timeout_stop_in_one_line(tmp_path):
    """Real ranks: rank 0 used to crash on a LOCK that is not UTF-8, and to watch a lock it
    cannot check for 60 s while the others died in gloo after train.dist_timeout_min."""
    from launching import launch

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")  # never read: the lock comes first
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "LOCK").write_bytes(b"\xff\xfe\x00 not UTF-8")
    result = launch("trainer/main.py", "--config", "configs/demo.yaml",
                    f"data.shards={tmp_path / 'shards'}", f"runs_dir={tmp_path / 'runs'}",
                    "name=x", "train.dist_timeout_min=0.5", timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    # said once by rank 0, no rank's traceback (the launcher's own report of the exit follows)
    assert result.stderr.count("run directory error:") == 1, result.stderr[-3000:]
    line = result.stderr.split("run directory error: ", 1)[1].splitlines()[0]
    assert line.startswith(f"{run / 'LOCK'}: the run directory is held by an unreadable lock "
                           "record (b'\\xff\\xfe\\x00 not UTF-8')")
    assert line.endswith("set train.dist_timeout_min >= 2")
    assert "UnicodeDecodeError" not in result.stderr and "Traceback" not in result.stdout
    assert "gloo" not in result.stderr.lower() and "timed out" not in result.stderr.lower()
    assert sorted(p.name for p in run.iterdir()) == ["LOCK"]
    assert (run / "LOCK").read_bytes() == b"\xff\xfe\x00 not UTF-8"
