"""Stop requests: one signal asks for a checkpoint and a clean exit, a second one aborts,
and Slurm's doubled SIGTERM (two within a millisecond) counts as one."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launching import TINY

SCRIPT = """
import os, signal, time
from trainer.stop import StopRequest
stop = StopRequest()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the same request, delivered twice
time.sleep(0.05)
print("requested", stop.requested, "agreed", stop.agreed(__import__("torch").device("cpu")),
      flush=True)
time.sleep(1.2)
os.kill(os.getpid(), signal.SIGUSR1)  # a real second request: abort at once
time.sleep(2)
print("still running", flush=True)
"""


def test_one_request_survives_a_doubled_signal_and_a_second_one_aborts():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=60)
    assert "requested True agreed True" in result.stdout
    assert "still running" not in result.stdout
    assert result.returncode == -10  # killed by SIGUSR1's default action
    assert "aborting at once" in result.stderr


def test_a_stop_file_is_a_request(tmp_path):
    code = ("import torch; from trainer.stop import StopRequest; "
            f"s = StopRequest({str(tmp_path / 'stop')!r}); d = torch.device('cpu'); "
            "print(s.agreed(d)); open(s.stop_file, 'w').close(); print(s.agreed(d))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "True"], result.stderr


# -- in the training loop: agreements every train.stop_check_every steps ---------------------

@pytest.mark.parametrize("request_by", ["file", "signal"])
def test_a_request_mid_run_stops_at_the_next_agreement_with_a_checkpoint_then_resumes(
        shards, tmp_path, monkeypatch, capsys, request_by):
    """Agreements at 3, 6, 9, 12 (stop_check_every=3; checkpoints only at the end): asked
    during step 4, the run saves and stops at 6; the stop file is read only at agreements;
    the same command resumes at 6 and completes."""
    from test_trainer import run_main

    import trainer.train

    stop_file = tmp_path / "stop"
    monkeypatch.setenv("TRICOLOR_STOP_FILE", str(stop_file))
    steps, stats = [], []
    real_step, real_exists = trainer.train.train_step, Path.exists

    def train_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            if request_by == "file":
                stop_file.touch()
            else:
                os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(*args, **kwargs)

    def exists(path, *args, **kwargs):
        if path == stop_file:
            stats.append(len(steps))
        return real_exists(path, *args, **kwargs)

    monkeypatch.setattr(trainer.train, "train_step", train_step)
    monkeypatch.setattr(Path, "exists", exists)
    args = ["--config", "configs/demo.yaml", f"data.shards={shards}", f"runs_dir={tmp_path}",
            "name=run", *TINY, "train.max_steps=12", "train.stop_check_every=3",
            "train.log_every=4", "train.checkpoint_every=0", "train.val_every=0",
            "train.image_every=0", "train.mixed_precision=no"]
    assert run_main(args) == 0
    run = tmp_path / "run"
    assert len(steps) == 6  # a signal is enough: then the file is not read at 6
    assert stats == ([3, 6] if request_by == "file" else [3])
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000006"]
    assert not (run / "COMPLETE").exists()

    stop_file.unlink(missing_ok=True)
    capsys.readouterr()
    assert run_main(args) == 0
    assert "at step 6" in capsys.readouterr().out.split("resumed from", 1)[1]
    assert len(steps) == 12 and (run / "COMPLETE").is_file()
