"""Host syncs of the real training loop, counted per step, and the device-side bookkeeping
that replaced the per-step ones (skip counters, `train.max_nonfinite`).

`trainer.train.train` runs in this process (1 rank, CPU, fp32, tiny) with the Python ways of
reading a tensor on the host patched to count: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
`bool()`, `float()`, `int()`. On a GPU each of them waits for the device queue to drain. Not
counted: the data loader (it decodes on the host), and the tensors that live on the host on a
GPU run too (Adam's step counters). Syncs inside C++ operators
(SyncBatchNorm's masking, for instance) are not seen here; on a GPU,
`torch.cuda.set_sync_debug_mode` sees those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch
from launching import TINY

import trainer.train
from trainer.config import load_config
from trainer.data import TripletLoader
from trainer.launch import make_accelerator
from trainer.run_log import Window

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
        gan, ids = self.gan, set()
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
    """The step's skip decision stays on the device (trainer/step.py)."""
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


def test_with_gradient_accumulation_skipped_updates_in_a_row_stop_the_run(shards, tmp_path,
                                                                          monkeypatch,
                                                                          one_thread):
    """grad_accum=2 on DDP: the skip is decided at the accumulation boundary, and the batch
    between two boundaries reports nothing skipped; it must not end the streak. Every loss
    is NaN: skipped updates at batches 2, 4, 6 (3 in a row, the limit), read at the log of
    step 8 (4 by then)."""
    real = trainer.train.train_step

    def train_step(accelerator, gan, batch, step=None):
        return real(accelerator, gan, dataclasses.replace(batch, cond=batch.cond * math.nan),
                    step)

    monkeypatch.setattr(trainer.train, "train_step", train_step)
    with pytest.raises(FloatingPointError, match=r"^4 steps in a row had a non-finite loss "
                                                 r"\(step 8\)"):
        run_train(shards, tmp_path, monkeypatch, "train.max_nonfinite=3", "train.grad_accum=2")


class Identity:
    """An accelerator whose cross-rank mean is the value itself (one rank)."""

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def flags(g=0.0, d=0.0, **grads) -> dict[str, torch.Tensor]:
    out = {"Skipped/G": torch.tensor(g), "Skipped/D": torch.tensor(d)}
    return out | {f"Grad/{k}": torch.tensor(v) for k, v in grads.items()}


def test_the_window_streak_counts_updates_across_accumulation_windows():
    window = Window(torch.device("cpu"))
    # grad_accum=2, DDP: only the boundary reports a skip; the batch between does not reset
    for boundary, skipped in ((False, 0), (True, 1), (False, 0), (True, 1), (False, 0),
                              (True, 0), (False, 0), (True, 1)):
        window.add(flags(g=skipped), boundary)
    assert window.skips() == (3, 2)
    # DeepSpeed: a skipped micro-batch between boundaries counts, and the streak goes on
    window.add(flags(d=1.0), False)
    window.add(flags(g=1.0), True)
    assert window.skips() == (2, 3)
    window.add(flags(), True)  # an update that succeeded ends it
    window.add(flags(g=1.0), True)
    assert window.skips() == (1, 1)


def test_grad_norms_of_skipped_updates_are_left_out_of_the_window_mean():
    window = Window(torch.device("cpu"))
    for norm in (2.0, math.nan, math.inf, 4.0):
        window.add(flags(g=float(not math.isfinite(norm)), G=norm, D=math.nan), True)
    window.add(flags(), False)  # between boundaries: no norm reported
    scalars, skipped, longest = window.reduce(Identity, {})
    assert scalars["Grad/G"] == 3.0  # the mean of the finite ones
    assert math.isnan(scalars["Grad/D"])  # none finite in this window: not measured
    assert scalars["Skipped/G"] == pytest.approx(2 / 5) and (skipped, longest) == (2, 2)
    window.add(flags(G=5.0), True)  # the next window starts over
    assert window.reduce(Identity, {})[0]["Grad/G"] == 5.0
