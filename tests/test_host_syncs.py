"""Host syncs of the real training loop, counted per step, and the device-side bookkeeping
that replaced the per-step ones (skip counters, `train.max_nonfinite`).

`trainer.train.train` runs in this process (1 rank, CPU, fp32, tiny) with the Python ways of
reading a tensor on the host patched to count: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
`bool()`, `float()`, `int()`. On a GPU each of them waits for the device queue to drain. Not
counted: the data loader (it decodes on the host), and the tensors that live on the host on a
GPU run too (the EMA's update counter, Adam's step counters). Syncs inside C++ operators
(SyncBatchNorm's masking, for instance) are not seen here; on a GPU,
`torch.cuda.set_sync_debug_mode` sees those.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from launching import TINY

import trainer.train
from trainer.backend import make_accelerator
from trainer.config import load_config
from trainer.data import TripletLoader

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
# 12 steps: logs at 4, 8, 12; stop agreements at 3, 6, 9, 12; validation, checkpoint and
# export at 12 (the last step) only.
SETTINGS = ["train.max_steps=12", "train.log_every=4", "train.stop_check_every=3",
            "train.checkpoint_every=0", "train.val_every=0", "train.image_every=0",
            "train.mixed_precision=no", "model.norm=group"]


class Census:
    """Host reads per training step, split into those inside `train_step` and those of the
    loop around it (everything after one `train_step` call up to the next)."""

    def __init__(self):
        self.steps: list[dict[str, list[str]]] = []  # per step: {"step": [...], "loop": [...]}
        self.where = None  # None: before the first step (set-up), not counted
        self.paused = 0
        self.host: set[int] = set()  # ids of tensors that are host counters on a GPU run too
        self.gan = None

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def host_counters(self) -> set[int]:
        gan = self.gan
        ids = {id(gan.ema.num_updates)}
        for opt in (gan.opt_G, gan.opt_D):
            ids |= {id(s["step"]) for s in opt.state.values() if "step" in s}
        return ids

    def record(self, name: str, tensor: torch.Tensor) -> None:
        if self.where is None or self.paused or id(tensor) in self.host_counters():
            return
        self.steps[-1][self.where].append(f"{name} {tuple(tensor.shape)}")


def install_census(monkeypatch) -> Census:
    census = Census()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            census.record(_name, self)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    real_build, real_step, real_iter = (trainer.train.build_gan, trainer.train.train_step,
                                        TripletLoader.__iter__)

    def build_gan(cfg, accelerator):
        census.gan = real_build(cfg, accelerator)
        return census.gan

    def train_step(*args, **kwargs):
        census.steps.append({"step": [], "loop": []})
        census.where = "step"
        try:
            return real_step(*args, **kwargs)
        finally:
            census.where = "loop"

    def batches(loader):  # the loader reads on the host by design
        it = real_iter(loader)
        while True:
            with census.pause():
                batch = next(it, None)
            if batch is None:
                return
            yield batch

    monkeypatch.setattr(trainer.train, "build_gan", build_gan)
    monkeypatch.setattr(trainer.train, "train_step", train_step)
    monkeypatch.setattr(TripletLoader, "__iter__", batches)
    return census


def run_train(shards, run_dir, monkeypatch, *extra: str):
    """trainer.train.train in this process: 1 rank on the CPU, fp32."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    cfg = load_config("configs/demo.yaml",
                      [f"data.shards={shards}", *TINY, *SETTINGS, *extra])
    torch.manual_seed(0)
    return trainer.train.train(cfg, make_accelerator(cfg, "no"), run_dir)


@pytest.fixture(scope="module")
def counted(shards, tmp_path_factory, one_thread):
    """The census of a 12-step run."""
    with pytest.MonkeyPatch.context() as mp:
        census = install_census(mp)
        run_train(shards, tmp_path_factory.mktemp("census"), mp)
    return census.steps


def test_the_loop_reads_the_device_only_at_log_and_stop_agreement_steps(counted):
    assert len(counted) == 12
    loop = {step: reads["loop"] for step, reads in enumerate(counted, start=1)}
    for step in (1, 2, 5, 7, 10, 11):  # ordinary steps: nothing
        assert loop[step] == [], (step, loop[step])
    for step in (3, 6, 9):  # the stop agreement: one .item() of the reduced flag
        assert loop[step] == ["item ()"], (step, loop[step])
    for step in (4, 8):  # the log: one .tolist() of everything stacked
        assert len(loop[step]) == 1 and loop[step][0].startswith("tolist "), (step, loop[step])


def test_train_step_reads_nothing_from_the_device(counted):
    """The step's skip decision stays on the device (issue 18, H1: trainer/step.py)."""
    inside = {step: reads["step"] for step, reads in enumerate(counted, start=1)}
    assert all(reads == [] for reads in inside.values()), inside


# -- the skip bookkeeping on the device ----------------------------------------------------

def fake_skips(monkeypatch, steps: set[int]):
    """train_step reports its G update as skipped at these steps (1-based), as a device
    tensor; the update itself happens (the bookkeeping is what is tested)."""
    real = trainer.train.train_step
    done = []

    def train_step(accelerator, gan, batch, step=None):
        out = real(accelerator, gan, batch, step)
        done.append(1)
        if len(done) in steps:
            out["Skipped/G"] = torch.ones((), device=accelerator.device)
        return out

    monkeypatch.setattr(trainer.train, "train_step", train_step)


def test_skipped_total_is_exact_at_checkpoints_and_logged(shards, tmp_path, monkeypatch,
                                                           one_thread):
    from test_checkpoint import losses

    fake_skips(monkeypatch, {2, 3, 7})
    # checkpoints at 3 (between logs: the counters are read alone), 6, 9, 12
    run_train(shards, tmp_path, monkeypatch, "train.checkpoint_every=3")
    saved = {int(p.name.removeprefix("step_")): json.loads((p / "trainer.json").read_text())
             for p in (tmp_path / "checkpoints").glob("step_*")}
    assert {s: saved[s]["skipped_total"] for s in sorted(saved)} \
        == {s: n for s, n in {3: 2, 6: 2, 9: 3, 12: 3}.items() if s in saved}
    assert 12 in saved
    assert losses(tmp_path, "Skipped/total") == {4: 2, 8: 3, 12: 3}
    assert losses(tmp_path, "Skipped/G") == {4: 0.5, 8: 0.25, 12: 0.0}  # fraction of steps


def test_too_many_skips_in_a_row_stop_the_run_at_the_next_log_step(shards, tmp_path,
                                                                   monkeypatch, one_thread):
    fake_skips(monkeypatch, {2, 5, 6, 7})  # 3 in a row, reached at step 7, read at step 8
    with pytest.raises(FloatingPointError, match=r"^3 steps in a row had a non-finite loss "
                                                 r"\(step 8\); stopping instead"):
        run_train(shards, tmp_path, monkeypatch, "train.max_nonfinite=3")
    assert not list((tmp_path / "checkpoints").glob("step_*"))
