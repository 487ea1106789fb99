"""Stop requests: one signal asks for a checkpoint and a clean exit, a second one aborts,
and Slurm's doubled SIGTERM (two within a millisecond) counts as one."""

import subprocess
import sys

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
