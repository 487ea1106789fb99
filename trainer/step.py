"""One training step of the GAN: a D phase, then a G phase, as explicit phases.

    D phase:  D learns real (condition, colour_t) -> real, (condition, G(condition)) -> fake
    G phase:  G learns to make D call its output real, plus lambda_pixel * |G - colour_t|
              (and lambda_chroma * the chroma term); during the pixel-only warm-up (trainer
              steps before loss.adv_start_step) without the adversarial term, D still training

Gradient synchronization goes only through `accelerator.accumulate(G, D)` (one context for
both, per batch). Wrapping, autocast, backward, clipping, loss scaling and the optimizer step
are the backend's (`gan.backend`, trainer/backend.py: DDP or DeepSpeed); this file is the same
for both. Losses are fp32 (models/). A phase whose loss is not finite on some rank is skipped
on every rank (a reduced flag), so no rank waits alone in a collective and no optimizer trains
on garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor, nn

from models import assemble_d_input, has_memory, previous_colour
from models.losses import GANLoss
from trainer.data import Batch
from trainer.ema import EMA
from trainer.sn_sync import broadcast_spectral_norm


@dataclass
class GAN:
    """Everything a step touches. G and D are the prepared modules (DDP-wrapped, or DeepSpeed
    engines), `backend` the object that drives them."""

    G: nn.Module
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    loss: GANLoss
    ema: EMA
    model_cfg: object  # ModelConfig
    backend: object  # trainer.backend.DDPBackend | DeepSpeedBackend
    grad_clip: float = 0.0
    d_steps_per_g: int = 1


def all_ranks_finite(*values: Tensor) -> bool:
    ok = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def optimize(backend, loss: Tensor, model, optimizer, grad_clip: float, name: str,
             out: dict) -> None:
    """Backward and step on `loss` unless it is not finite on some rank (then every rank
    skips, and `Skipped/<name>` is reported); records `Grad/<name>`, the gradient norm
    (before clipping to `grad_clip`), and `Skipped/fp16_overflow` when the loss scaler
    skipped the step."""
    if all_ranks_finite(loss):
        norm, overflow = backend.backward_step(loss, model, optimizer, grad_clip)
        if norm is not None:
            out[f"Grad/{name}"] = norm
        if overflow:
            out["Skipped/fp16_overflow"] = torch.ones((), device=loss.device)
    else:
        out[f"Skipped/{name}"] = torch.ones((), device=loss.device)
        backend.discard_gradients(loss, model, optimizer)


def generate(gan: GAN, G: nn.Module, batch: Batch) -> Tensor:
    """G's colour for frame t: a,b [B, 2, H, W] (grey mode) or Lab [B, 3, H, W] (line art),
    given the previous colour (none, G's own or the truth: models/memory.py) when G has a
    colour memory."""
    cfg = gan.model_cfg
    grey = str(getattr(cfg.mode, "value", cfg.mode)) == "grey"
    if not has_memory(cfg):
        return G(batch.cond)
    G_raw = getattr(G, "module", G)  # the extra no-grad call must not go through the wrapper
    memory = previous_colour(G_raw, batch.cond, batch.target, cfg)
    return G(batch.cond if grey else batch.cond[:, 1], memory)


def train_step(accelerator: Accelerator, gan: GAN, batch: Batch,
               step: int | None = None) -> dict[str, Tensor]:
    """One D update (or `d_steps_per_g`), then one G update. Returns scalars (not synced).

    `step`: the trainer's step counter (steps done before this one, restored on resume), which
    decides the pixel-only warm-up; needed only when loss.adv_start_step is set."""
    cfg, backend = gan.model_cfg, gan.backend
    adv_weight = gan.loss.adv_weight(step)
    real = batch.target[:, 1]  # colour of the centre frame
    D_raw = backend.unwrap(gan.D)
    out: dict[str, Tensor] = {}
    with accelerator.accumulate(gan.G, gan.D):
        with backend.autocast():
            fake = generate(gan, gan.G, batch)

        # D phase: real and fake through one forward (one power iteration per step).
        for _ in range(gan.d_steps_per_g):
            with backend.autocast():
                d_in = torch.cat([
                    assemble_d_input(cfg, batch.cond, real, batch.target),
                    assemble_d_input(cfg, batch.cond, fake.detach(), batch.target),
                ])
                real_logits, fake_logits = gan.D(d_in).chunk(2)
            d = gan.loss.d_loss(real_logits, fake_logits)
            optimize(backend, d.total, gan.D, gan.opt_D, gan.grad_clip, "D", out)

        # G phase: D frozen and called unwrapped, so DDP neither reduces nor waits for D's
        # gradients (none are computed; ZeRO-2 fails and ZeRO-1 steps D on G's gradients
        # otherwise).
        D_raw.requires_grad_(False)
        # In the warm-up D's opinion of the fake is only logged: no graph through D for it.
        with backend.autocast(), torch.set_grad_enabled(adv_weight > 0):
            fake_logits = D_raw(assemble_d_input(cfg, batch.cond, fake, batch.target))
        g = gan.loss.g_loss(fake_logits, fake, real, adv_weight)
        optimize(backend, g.total, gan.G, gan.opt_G, gan.grad_clip, "G", out)
        D_raw.requires_grad_(True)

    if accelerator.sync_gradients and "Skipped/G" not in out:
        gan.ema.update(backend.unwrap(gan.G))
    broadcast_spectral_norm(D_raw)
    out |= {
        "Loss/D/total": d.total.detach(),
        "Loss/D/real": d.real.detach(),
        "Loss/D/fake": d.fake.detach(),
        "Loss/G/total": g.total.detach(),
        "Loss/G/adv": g.adv.detach(),
        "Loss/G/pixel": g.pixel.detach(),
        "Loss/G/chroma": g.chroma.detach(),
        "Loss/G/adv_weight": g.total.new_full((), adv_weight),  # a fill, no host copy
    }
    return out
