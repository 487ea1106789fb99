"""The code paths of a GPU run, checked in one CPU process: no host synchronization in the DDP
step (its non-finite skip decided on the device), the fp16 GradScaler driven once per step, the
EMA copy without Accelerate's autocast wrapper, and the Accelerator's DDP and process-group
settings."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
import torch
from accelerate import Accelerator
from launching import TINY

from trainer import launch
from trainer.backends.ddp import DDPBackend
from trainer.config import load_config
from trainer.data import Batch
from trainer.step import train_step
from trainer.train import build_gan

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def tiny(*extra: str):
    return load_config("configs/demo.yaml", ["data.shards=unused", *TINY, *extra])


def batch(nan: bool = False, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(2, 3, 1, 32, 32, generator=g) * 2 - 1
    if nan:
        cond[0, 1, 0, 0, 0] = float("nan")
    return Batch(cond, torch.rand(2, 3, 2, 32, 32, generator=g) - 0.5, ["a", "b"])


@contextlib.contextmanager
def counting_host_reads():
    """Counts every Python-level read of a tensor's value on the host: each is a device
    synchronization on a GPU."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_ddp_step_reads_nothing_on_the_host_and_still_skips_a_non_finite_loss(fresh_state):
    accelerator = Accelerator(cpu=True)
    gan = build_gan(tiny("model.norm=group"), accelerator)
    assert all(opt.defaults["fused"] for opt in (gan.opt_G, gan.opt_D))
    outs, before_nan, after_nan = [], None, None
    with counting_host_reads() as calls:
        for i in range(4):
            if i == 2:
                before_nan = params(gan.G), params(gan.D), params(gan.ema.model)
            outs.append(train_step(accelerator, gan, batch(nan=i == 2, seed=i)))
            if i == 2:
                after_nan = params(gan.G), params(gan.D), params(gan.ema.model)
    assert calls == []
    for i, out in enumerate(outs):
        assert all(v.ndim == 0 and v.is_floating_point() for v in out.values())
        skipped = 1.0 if i == 2 else 0.0
        assert out["Skipped/G"].item() == out["Skipped/D"].item() == skipped
        assert out["Skipped/fp16_overflow"].item() == 0.0
    # the skipped step changed neither network nor their Adam step counts; the EMA moved
    # towards G's unchanged weights only
    assert same(before_nan[0], after_nan[0]) and same(before_nan[1], after_nan[1])
    assert all(torch.isfinite(p).all() for p in after_nan[2])
    steps = {float(s["step"]) for opt in (gan.opt_G, gan.opt_D) for s in opt.state.values()}
    assert steps == {3.0}
    assert not same(after_nan[0], params(gan.G))  # the next step trains again


def test_without_clipping_the_norm_is_only_measured(fresh_state, monkeypatch):
    backend = DDPBackend(Accelerator(cpu=True))
    model = torch.nn.Linear(3, 1)
    opt = backend.adam(model.parameters(), lr=0.0, betas=(0.5, 0.999))
    # clip_grad_norm_(..., inf) would multiply every gradient by 1 (inf / inf = NaN for inf
    # gradients)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", None)
    for scale, finite in ((1.0, True), (1e30, False)):  # 1e30 * 1e10: inf gradients
        x = torch.full((1, 3), scale)
        loss = model(x).sum() * 1e10
        norm, skipped, overflow = backend.backward_step(loss, model, opt, grad_clip=0.0)
        expected = torch.tensor([1e10 * scale] * 3 + [1e10]).norm()
        assert torch.isfinite(norm) == finite and (not finite or torch.allclose(norm, expected))
        assert skipped.item() == float(not finite) and overflow.item() == 0.0
        assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    assert float(opt.state[model.weight]["step"]) == 1.0  # the inf step did not count


def adam_steps(opt) -> set[float]:
    return {float(s["step"]) for s in opt.state.values()}


@contextlib.contextmanager
def inflated_losses(gan, factor: float):
    """G's and D's losses times `factor`: finite, but past the fp16 range once scaled."""
    real = {"d_loss": gan.loss.d_loss, "g_loss": gan.loss.g_loss}
    for name, fn in real.items():
        setattr(gan.loss, name,
                lambda *a, _fn=fn, **k: (r := _fn(*a, **k))._replace(total=r.total * factor))
    try:
        yield
    finally:
        for name in real:
            delattr(gan.loss, name)


@pytest.mark.parametrize("d_steps", [1, 2])
def test_fp16_scaler_updates_once_per_step_and_counts_its_own_skips(fresh_state, d_steps):
    """With optim.d_steps_per_g=2, D is unscaled and stepped twice between two updates, which
    GradScaler refuses by itself ("unscale_() is being called after step()")."""
    accelerator = Accelerator(cpu=True)
    gan = build_gan(tiny(f"optim.d_steps_per_g={d_steps}"), accelerator)
    # fp16 autocast needs a GPU; the scaler's arithmetic is the same on CPU
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    updates = []
    update = scaler.update
    scaler.update = lambda *a: (updates.append(1), update(*a))[1]
    out = train_step(accelerator, gan, batch())
    assert len(updates) == 1 and out["Skipped/fp16_overflow"].item() == 0.0
    assert scaler.get_scale() == 2.0 ** 16
    assert adam_steps(gan.opt_D) == {float(d_steps)} and adam_steps(gan.opt_G) == {1.0}

    scaler.update(2.0 ** 120)
    updates.clear()
    start = params(gan.G), params(gan.D)
    with inflated_losses(gan, 2.0 ** 20):  # finite losses, overflowing G's and D's scaled ones
        out = train_step(accelerator, gan, batch(seed=1))
    assert len(updates) == 1
    assert out["Skipped/fp16_overflow"].item() == 1.0
    assert out["Skipped/G"].item() == out["Skipped/D"].item() == 0.0
    assert same(start[0], params(gan.G)) and same(start[1], params(gan.D))
    assert adam_steps(gan.opt_D) == {float(d_steps)} and adam_steps(gan.opt_G) == {1.0}
    assert scaler.get_scale() == 2.0 ** 119  # backed off once, not once per optimizer step

    scaler.update(2.0 ** 16)
    out = train_step(accelerator, gan, batch(nan=True, seed=2))
    assert out["Skipped/G"].item() == out["Skipped/D"].item() == 1.0
    assert out["Skipped/fp16_overflow"].item() == 0.0
    assert scaler.get_scale() == 2.0 ** 15  # a non-finite loss backs off too (documented)

    out = train_step(accelerator, gan, batch(seed=3))  # trains again, at that scale
    assert out["Skipped/G"].item() == out["Skipped/D"].item() == 0.0
    assert out["Skipped/fp16_overflow"].item() == 0.0
    assert adam_steps(gan.opt_D) == {2.0 * d_steps} and adam_steps(gan.opt_G) == {2.0}
    assert scaler.get_scale() == 2.0 ** 15


def test_fp16_a_second_d_step_is_unscaled_by_the_scale_its_loss_was_scaled_with(fresh_state):
    """optim.d_steps_per_g=2 with an overflowing first D step: the second D step must see the
    gradients of an fp32 run (the scale is the same from its backward to its unscale_; an
    update() between the two steps would back it off in between and double them)."""
    def step(fp16: bool):
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        gan = build_gan(tiny("optim.d_steps_per_g=2"), accelerator)
        if fp16:
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        real, calls = gan.loss.d_loss, []

        def d_loss(real_logits, fake_logits):  # the first D step of the step is skipped
            d = real(real_logits, fake_logits)
            calls.append(1)
            if len(calls) == 1:  # fp16: finite, inf once scaled; fp32: a NaN loss
                d = d._replace(total=d.total * (2.0 ** 120 if fp16 else float("nan")))
            return d

        gan.loss.d_loss = d_loss
        torch.manual_seed(1)
        return gan, train_step(accelerator, gan, batch()), accelerator.scaler

    gan16, out16, scaler = step(fp16=True)
    gan32, out32, _ = step(fp16=False)
    assert out16["Skipped/fp16_overflow"].item() == 1.0 and out16["Skipped/D"].item() == 0.0
    assert out32["Skipped/D"].item() == 1.0
    assert scaler.get_scale() == 2.0 ** 15  # backed off once, at the end of the step
    assert adam_steps(gan16.opt_D) == adam_steps(gan32.opt_D) == {1.0}  # the second step
    assert torch.allclose(out16["Grad/D"], out32["Grad/D"], rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
               for a, b in zip(params(gan16.D), params(gan32.D)))


def test_the_ema_copy_runs_without_the_training_models_autocast(fresh_state):
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    gan = build_gan(tiny("model.zero_init_head=false"), accelerator)  # an output to compare
    G = gan.backend.unwrap(gan.G)
    assert "forward" in G.__dict__  # Accelerate's autocast wrapper on the training G
    ema = gan.ema.model
    assert "forward" not in ema.__dict__ and "_original_forward" not in ema.__dict__
    assert ema.forward.__func__ is type(ema).forward
    x = batch().cond
    with torch.no_grad():
        assert ema(x).dtype == torch.float32
        # the wrapper returns fp32 too: what tells is the arithmetic, which bf16 rounds
        assert not torch.equal(G(x), ema(x))
        G.load_state_dict(ema.state_dict())
        assert not torch.equal(G(x), ema(x))  # same weights, different precision
        assert torch.equal(G._original_forward(x), ema(x))


def test_make_accelerator_sets_ddp_options_and_the_timeout(fresh_state):
    cfg = tiny("train.dist_timeout_min=45")
    accelerator = launch.make_accelerator(cfg, "no")
    assert accelerator.ddp_handler.broadcast_buffers is False
    assert accelerator.ddp_handler.gradient_as_bucket_view is True
    assert accelerator.init_handler.timeout == timedelta(minutes=45)


@pytest.mark.parametrize("available, count, local_world, expected", [
    (False, 0, "2", False), (True, 1, "2", False), (True, 2, "2", True), (True, 8, "8", True)])
def test_deepspeed_uses_nccl_only_when_each_local_rank_has_a_gpu(monkeypatch, available, count,
                                                                  local_world, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert launch._gpu_per_local_rank() is expected
