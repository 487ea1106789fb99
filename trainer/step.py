"""One training step of the GAN: a D phase, then a G phase, as explicit phases.

    D phase:  D learns real (condition, colour_t) -> real, (condition, G(condition)) -> fake
    G phase:  G learns to make D call its output real, plus lambda_pixel * |G - colour_t|
              (and lambda_chroma * the chroma term, lambda_temporal * the flow-warped,
              occlusion-masked L1 to its own colour of t-1 when the shards carry flow);
              during the pixel-only warm-up (trainer steps before loss.adv_start_step)
              without the adversarial term, D still training

Gradient synchronization goes only through `accelerator.accumulate(G, D)` (one context for
both, per batch). Wrapping, autocast, backward, clipping, loss scaling and the optimizer step
are the backend's (`gan.backend`, trainer/backends/: DDP or DeepSpeed); this file is the same
for both. Losses are fp32 (models/). A phase whose loss is not finite on some rank is skipped
on every rank (DDP: decided on the device from the all-reduced gradients, no host sync;
DeepSpeed: a reduced flag), so no rank waits alone in a collective and no optimizer trains on
garbage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from models import assemble_d_input, has_memory, previous_colour
from models.losses import GANLoss
from models.rollout import centre_input, first_frame_colour
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
    backend: object  # trainer.backends: DDPBackend | DeepSpeedBackend
    grad_clip: float = 0.0
    d_steps_per_g: int = 1


def optimize(backend, loss: Tensor, model, optimizer, grad_clip: float, name: str,
             out: dict) -> None:
    """Backward and step on `loss` (the backend skips the update on every rank when it is
    not finite on some rank); records `Grad/<name>`, the gradient norm (before clipping to
    `grad_clip`; not finite when the update was skipped, and left out of the logged mean:
    trainer/run_log.py Window), and sets `Skipped/<name>` and `Skipped/fp16_overflow` to 1 when this
    phase's update was skipped as non-finite or by the fp16 loss scaler."""
    norm, skipped, overflow = backend.backward_step(loss, model, optimizer, grad_clip)
    if norm is not None:
        out[f"Grad/{name}"] = norm
    for key, flag in ((f"Skipped/{name}", skipped), ("Skipped/fp16_overflow", overflow)):
        out[key] = torch.maximum(out[key], flag)  # d_steps_per_g > 1: any of them


def wants_previous(gan: GAN, batch: Batch) -> bool:
    """Whether this step needs G's own colour for frame t-1: for scheduled sampling, or for
    the temporal loss (when the batch carries flow)."""
    cfg = gan.model_cfg
    sampling = has_memory(cfg) and cfg.scheduled_sampling > 0 and cfg.temporal
    return sampling or (gan.loss.lambda_temporal > 0 and batch.flow is not None)


def generate(gan: GAN, G: nn.Module, batch: Batch) -> tuple[Tensor, Tensor | None]:
    """G's colour for frame t: a,b [B, 2, H, W] (grey mode) or Lab [B, 3, H, W] (line art),
    given the previous colour (none, G's own or the truth: models/memory.py) when G has a
    colour memory; and G's own colour for frame t-1 (no gradient; from no memory, as at a
    shot's first frame) when the step needs it, else None."""
    cfg = gan.model_cfg
    own = None
    if wants_previous(gan, batch):
        G_raw = getattr(G, "module", G)  # the extra no-grad call must not go through DDP
        own = first_frame_colour(G_raw, batch.cond, cfg.mode, memory=has_memory(cfg))
    if not has_memory(cfg):
        return G(batch.cond), own
    memory = previous_colour(batch.cond, batch.target, cfg, own=own)
    return G(centre_input(batch.cond, cfg.mode), memory), own


def train_step(accelerator: Accelerator, gan: GAN, batch: Batch,
               step: int | None = None) -> dict[str, Tensor]:
    """One D update (or `d_steps_per_g`), then one G update. Returns 0-dim float tensors on
    the device, never read on the host here: the losses, `Grad/*` at accumulation boundaries,
    and always `Skipped/D`, `Skipped/G` (1: that update was skipped as non-finite, on every
    rank alike) and `Skipped/fp16_overflow` (1: the fp16 loss scaler skipped a step).

    `step`: the trainer's step counter (steps done before this one, restored on resume), which
    decides the pixel-only warm-up; needed only when loss.adv_start_step is set."""
    cfg, backend = gan.model_cfg, gan.backend
    adv_weight = gan.loss.adv_weight(step)
    real = batch.target[:, 1]  # colour of the centre frame
    D_raw = backend.unwrap(gan.D)
    zero = torch.zeros((), device=accelerator.device)
    out = {"Skipped/D": zero, "Skipped/G": zero, "Skipped/fp16_overflow": zero}
    with accelerator.accumulate(gan.G, gan.D):
        with backend.autocast():
            fake, fake_prev = generate(gan, gan.G, batch)

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
        previous = None if batch.flow is None or fake_prev is None else (
            fake_prev, batch.flow[:, 0], batch.flow_mask[:, 0])  # t -> t-1
        g = gan.loss.g_loss(fake_logits, fake, real, adv_weight, previous)
        optimize(backend, g.total, gan.G, gan.opt_G, gan.grad_clip, "G", out)
        D_raw.requires_grad_(True)

    backend.end_step()
    # Also after a skipped G step, so that no host decision is needed: the skip left G's
    # weights as they were, and the average moves towards weights it already follows.
    if accelerator.sync_gradients:
        gan.ema.update(backend.unwrap(gan.G))
    broadcast_spectral_norm(D_raw)
    out |= {
        "Loss/D/total": d.total.detach(),
        "Loss/D/real": d.real.detach(),
        "Loss/D/fake": d.fake.detach(),
        **{f"Loss/G/{name}": term.detach() for name, term in g._asdict().items()
           if term is not None},
        "Loss/G/adv_weight": g.total.new_full((), adv_weight),  # a fill, no host copy
    }
    return out
