"""slurm/ scripts on a real Slurm: a throw-away cluster of two emulated nodes on this machine
(tests/slurm_cluster.py), brought up once for this module and torn down by PID afterwards.

- slurm/shards.sbatch as an array job over the two sample clips: slices, merge, verify;
- slurm/train.sbatch on 2 nodes x 1 CPU rank, preempted with SIGUSR1 to the batch shell (what
  `--signal=B:USR1@N` does before the time limit) and, separately, requeued from outside with
  `scontrol requeue` (what PreemptMode=REQUEUE does): each run checkpoints, is requeued once,
  resumes from that checkpoint and completes, every step trained exactly once; each start
  logs nproc, CPU affinity and the NCCL settings; without a GPU it fails at once unless
  TRICOLOR_ALLOW_CPU=1;
- slurm/colorize.sbatch as a 2-task array over 3 tiny videos and a broken one: every good
  video colorized, the broken one named and its task failed; resubmitted after one output
  was deleted, only that one is redone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import TINY, free_port
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_colorize import decode, tiny_export
from videos import textured_frames, write_video

from inference.colorize import output_complete
from shards.video import sample_video

ROOT = Path(__file__).parent.parent
STEPS = 200  # ~10 s of steps on 2 emulated nodes x 1 CPU rank; a job with a requeue ~50 s
BATCH_ENV = {"TRICOLOR_VENV": sys.prefix, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root; run the tests as root")
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm on this machine: {e}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nnodes=2, cpus=2)
    try:
        cluster.up()
        yield cluster
    finally:
        leftovers = cluster.down()
    assert not leftovers, f"processes were still running after the daemons stopped: {leftovers}"


@pytest.fixture(scope="module")
def slurm_shards(slurm, tmp_path_factory):
    """The two sample clips sharded by `slurm/shards.sbatch` as a 2-task array job."""
    work = tmp_path_factory.mktemp("slurm-shards")
    out = work / "shards"
    videos = [str(sample_video("bigbuckbunny.mp4")), str(sample_video("bikes.mp4"))]
    job = slurm.sbatch("--array=0-1", "--cpus-per-task=1", "--mem=500M",
                       f"--output={work}/%x-%A_%a.log", "slurm/shards.sbatch", str(out), *videos,
                       "--short-side", "64", "--seed", "2", env=BATCH_ENV, cwd=ROOT)
    tasks = slurm.wait_finished(job, timeout=180)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(work.glob("*.log")))
    return out, tasks, logs


def test_shards_array_job_builds_slices_and_merges(slurm_shards):
    out, tasks, logs = slurm_shards
    assert sorted(t.get("ArrayTaskId") for t in tasks) == ["0", "1"], tasks
    for t in tasks:
        assert (t["JobState"], t["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert (out / "manifest-s0of2.json").is_file() and (out / "manifest-s1of2.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(Path(s["path"]).name for s in manifest["sources"]) == [
        "bigbuckbunny.mp4", "bikes.mp4"]
    assert manifest["splits"]["train"]["samples"] > 0
    assert "slices done: merging" in logs
    verify = subprocess.run([sys.executable, "-m", "shards", "verify", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# -- training ------------------------------------------------------------------------------


def test_train_without_gpu_fails_at_once_unless_allowed(slurm, tmp_path):
    """X3: no GPU and no TRICOLOR_ALLOW_CPU=1: one line saying what to do, exit 1, nothing
    started; the start logs the CPUs and the NCCL settings (X2, X4)."""
    job = slurm.sbatch(
        "--nodes=2", "--time=00:05:00", f"--output={tmp_path}/%x-%j.log",
        "slurm/train.sbatch", "configs/demo.yaml", f"runs_dir={tmp_path / 'runs'}", "name=cpu",
        env={**BATCH_ENV, "TRICOLOR_ALLOW_CPU": None, "NCCL_DEBUG": None,
             "TORCH_NCCL_ASYNC_ERROR_HANDLING": None, "NCCL_IB_HCA": None,
             "NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}, cwd=ROOT)
    (j,) = slurm.wait_finished(job, timeout=60)
    text = read(tmp_path / f"tricolor-train-{job}.log")
    assert (j["JobState"], j["ExitCode"]) == ("FAILED", "1:0"), f"{j}\n{text}"
    (line,) = [x for x in text.splitlines() if "error: no GPU visible" in x]
    assert "--gpus-per-node" in line and "TRICOLOR_ALLOW_CPU=1" in line, text
    assert "NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=3 NCCL_SOCKET_IFNAME=lo " \
           "NCCL_IB_HCA=unset GLOO_SOCKET_IFNAME=lo" in text, text
    assert re.search(r"batch shell on \S+: nproc 2, SLURM_CPUS_ON_NODE=2", text), text
    assert "accelerate" not in text and " start 1 " not in text, text


def submit_training(slurm: SlurmCluster, shards: Path, work: Path, name: str) -> tuple[str, Path]:
    job = slurm.sbatch(
        "--nodes=2", "--time=00:15:00", f"--output={work}/%x-%j.log",
        "slurm/train.sbatch", "configs/demo.yaml", f"data.shards={shards}",
        f"runs_dir={work / 'runs'}", f"name={name}", *TINY, f"train.max_steps={STEPS}",
        "train.log_every=1", "train.val_every=0", "train.image_every=0",
        "train.checkpoint_every=0",  # the only checkpoint before the end is the one on stop
        env={**BATCH_ENV, "TRICOLOR_PORT": str(free_port()), "TRICOLOR_ALLOW_CPU": "1"},
        cwd=ROOT)
    return job, work / f"tricolor-train-{job}.log"


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def wait_for_steps(slurm: SlurmCluster, job: str, log: Path, steps: int, timeout=150) -> None:
    """Until the trainer's progress bar in the job's log shows `steps` steps."""
    deadline = time.monotonic() + timeout
    while True:
        done = [int(n) for n in re.findall(rf"(\d+)/{STEPS} \[", read(log))]
        if done and max(done) >= steps:
            return
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state}:\n{read(log)}"
        assert time.monotonic() < deadline, f"no step {steps} in {timeout} s:\n{read(log)}"
        time.sleep(0.3)


def wait_requeued_then_finished(slurm: SlurmCluster, job: str, log: Path) -> dict[str, str]:
    """The job comes back (Restarts=1), runs again and ends; its final state."""
    def requeued(jobs):
        j = jobs[0]
        assert not (j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                    and j.get("Restarts") == "0"), f"job {job} ended unrequeued: {j}\n{read(log)}"
        return j.get("Restarts") == "1" and j["JobState"] != "COMPLETING"

    slurm.wait_until(job, requeued, timeout=120, what="requeued")
    # Slurm starts it again by itself after cred_expire + 1 s (10 + 1 here; 120 + 1 by
    # default). `scontrol update StartTime=now` in the same second as the requeue makes the
    # nodes reject the job ("Job credential revoked"): it fails instead of running.
    (j,) = slurm.wait_finished(job, timeout=240)
    return j


def logged_steps(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar over every TensorBoard file of the run (one per start)."""
    points = []
    for events_file in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(points)


def check_resumed_once(slurm: SlurmCluster, job: str, final: dict, log: Path, run: Path) -> int:
    """Checkpointed at step S, requeued once, resumed at S, completed; every step once."""
    text = read(log)
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == (
        "COMPLETED", "0:0", "1"), f"{final}\n{text}"
    starts = re.findall(r"\[train\.sbatch\] job \d+ start (\d+) ", text)
    assert starts == ["1", "2"], f"one log per job, appended per start:\n{text}"
    # X2: each node's task has all the CPUs the job got on it (2 per emulated node), unbound
    nprocs = re.findall(r"\[train\.sbatch\] node (\d) \(\S+\): SLURM_CPUS_PER_TASK=(\d+), "
                        r"nproc (\d+), pid \d+'s current affinity list: (?:0-1|0,1)$", text, re.M)
    assert sorted(nprocs) == [("0", "2", "2"), ("0", "2", "2"), ("1", "2", "2"),
                              ("1", "2", "2")], f"a line per node and start:\n{text}"
    assert "cpu binding" not in text, text  # --cpu-bind only where a task plugin binds
    assert text.count("NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=3") == 2, text
    stopped = {int(s) for s in re.findall(r"stopped on request at step (\d+)", text)}
    assert len(stopped) == 1, f"ranks stopped at {stopped}:\n{text}"  # a line per rank
    (step,) = stopped
    assert 0 < step < STEPS, text
    resumed = set(re.findall(r"resumed from (\S+) at step (\d+)", text))
    assert resumed, f"no 'resumed from' line:\n{text}"
    assert {int(n) for _, n in resumed} == {step}, f"resumed elsewhere than step {step}:\n{text}"
    assert all(Path(p).is_relative_to(run / "checkpoints") and Path(p).exists()
               for p, _ in resumed), resumed
    assert (run / "COMPLETE").is_file(), text
    # every step trained exactly once over the two starts, counters carried over
    steps = [s for s, _ in logged_steps(run, "Loss/G/total")]
    assert steps == list(range(1, STEPS + 1)), f"steps logged: {steps}"
    seen = logged_steps(run, "Progress/samples_seen")
    assert all(v == s * 2 * 2 for s, v in seen), seen  # batch 2 x 2 ranks
    meta = json.loads((run / "export" / "generator.json").read_text())
    assert meta["step"] == STEPS
    final_val = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final_val["step"] == STEPS and "psnr" in final_val
    return step


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_train_preempted_by_usr1_checkpoints_requeues_resumes_completes(
        slurm, slurm_shards, tmp_path):
    shards = slurm_shards[0]
    assert (shards / "manifest.json").is_file(), "the shards array job produced no data set"
    job, log = submit_training(slurm, shards, tmp_path, "usr1")
    wait_for_steps(slurm, job, log, 10)
    # what `#SBATCH --signal=B:USR1@N` sends before the time limit, here at once
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    final = wait_requeued_then_finished(slurm, job, log)
    text = read(log)
    assert "SIGUSR1" in text and text.count("stopped on request: requeueing job") == 1, text
    assert "training complete" in text, text
    check_resumed_once(slurm, job, final, log, tmp_path / "runs" / "usr1")
    assert not list((tmp_path / "runs" / "usr1").glob("stop-*")), "stop file left behind"


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_train_requeued_by_scontrol_checkpoints_and_resumes(slurm, slurm_shards, tmp_path):
    shards = slurm_shards[0]
    assert (shards / "manifest.json").is_file(), "the shards array job produced no data set"
    job, log = submit_training(slurm, shards, tmp_path, "requeue")
    wait_for_steps(slurm, job, log, 10)
    # what PreemptMode=REQUEUE does: SIGTERM to every process of the job, SIGKILL after KillWait
    slurm.run("scontrol", "requeue", job)
    final = wait_requeued_then_finished(slurm, job, log)
    text = read(log)
    assert "stopped on request: requeueing job" not in text, "Slurm requeued it, not the script"
    check_resumed_once(slurm, job, final, log, tmp_path / "runs" / "requeue")


# -- colorizing many videos -----------------------------------------------------------------


def colorize_logs(work: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(work.glob("*.log")))


def colorize_array(slurm, run: Path, listing: Path, out: Path, work: Path) -> dict[str, dict]:
    """slurm/colorize.sbatch as a 2-task array over `listing` into `out`, logs in `work`;
    waits for the tasks and returns them by array index."""
    work.mkdir()
    job = slurm.sbatch(
        "--array=0-1", "--cpus-per-task=1", "--mem=1G", f"--output={work}/%x-%A_%a.log",
        "slurm/colorize.sbatch", str(run), str(listing), str(out),
        "--size", "32", "--preset", "ultrafast",
        env={**BATCH_ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    return {t["ArrayTaskId"]: t for t in slurm.wait_finished(job, timeout=200)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_colorize_array_skips_complete_outputs_and_names_failures(slurm, tmp_path):
    tiny_export(tmp_path / "run" / "export")  # a run folder: colorize finds export/
    inputs = tmp_path / "in"
    inputs.mkdir()
    videos = [write_video(inputs / f"v{i}.mp4", textured_frames(6, 64, 48, seed=i))
              for i in range(3)]
    broken = inputs / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    # task 0: broken, v1 (tried after the failure); task 1: v0, v2
    listing = tmp_path / "videos.txt"
    listing.write_text("\n".join(map(str, [broken, *videos])) + "\n")
    out = tmp_path / "out"

    def submit(work: Path) -> dict[str, dict]:
        return colorize_array(slurm, tmp_path / "run", listing, out, work)

    tasks = submit(tmp_path / "first")
    logs = colorize_logs(tmp_path / "first")
    assert (tasks["0"]["JobState"], tasks["0"]["ExitCode"]) == ("FAILED", "1:0"), logs
    assert (tasks["1"]["JobState"], tasks["1"]["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert f"failed: {broken}" in logs and f"FAILED {broken} (exit status 1)" in logs, logs
    results = [out / f"v{i}.mp4" for i in range(3)]
    for v in results:
        assert output_complete(v), logs
        frames = decode(v)
        assert len(frames) == 6 and frames[0].shape == (48, 64, 3), v
    assert not output_complete(out / "broken.mp4")
    assert sorted(p.name for p in out.iterdir()) == ["v0.mp4", "v1.mp4", "v2.mp4"], "leftovers"

    # a requeue or resubmission: only the missing output is made again
    results[1].unlink()
    mtimes = {v: v.stat().st_mtime_ns for v in (results[0], results[2])}
    tasks = submit(tmp_path / "second")
    logs = colorize_logs(tmp_path / "second")
    assert tasks["0"]["ExitCode"] == "1:0" and tasks["1"]["ExitCode"] == "0:0", logs
    assert output_complete(results[1]) and len(decode(results[1])) == 6, logs
    assert {v: v.stat().st_mtime_ns for v in mtimes} == mtimes, "a complete output was redone"
    assert logs.count("exists (complete)") == 2 and logs.count("colorizing ") == 2, logs
    assert f"colorizing {videos[1]} -> {results[1]}" in logs, logs
    assert "task 1 of 2: 0 colorized, 2 skipped (already complete), 0 failed" in logs, logs
    assert "task 0 of 2: 1 colorized, 0 skipped (already complete), 1 failed" in logs, logs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_colorize_array_takes_a_video_listed_under_several_spellings_once(slurm, tmp_path):
    """One file listed as an absolute path, through `..` and through a symbolic link of the
    same name elsewhere: one video, not three inputs for one output name (which would fail
    every task before any work). Colorized once, by one task; the other has nothing to do."""
    tiny_export(tmp_path / "run" / "export")
    (tmp_path / "in").mkdir()
    (tmp_path / "other").mkdir()
    video = write_video(tmp_path / "in" / "v.mp4", textured_frames(6, 64, 48, seed=7))
    (tmp_path / "other" / "v.mp4").symlink_to(video)
    listing = tmp_path / "videos.txt"
    listing.write_text(f"{video}\n{tmp_path}/other/../in/v.mp4\n{tmp_path}/other/v.mp4\n")
    out, work = tmp_path / "out", tmp_path / "logs"
    tasks = colorize_array(slurm, tmp_path / "run", listing, out, work)
    logs = colorize_logs(work)
    for t in ("0", "1"):
        assert (tasks[t]["JobState"], tasks[t]["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert logs.count("colorizing ") == 1 and f"colorizing {video} -> {out / 'v.mp4'}" in logs
    assert sorted(p.name for p in out.iterdir()) == ["v.mp4"], logs
    assert len(decode(out / "v.mp4")) == 6
