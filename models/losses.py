"""GAN losses on D's logits, and the pixel loss; always computed in fp32.

With r = D(real) and f = D(fake) logits, means over every logit (patch or frame):

    adversarial  D loss (real part + fake part)          G loss
    lsgan        mean((r - 1)^2) + mean(f^2)              mean((f - 1)^2)
    vanilla      mean(softplus(-r)) + mean(softplus(f))   mean(softplus(-f))   (non-saturating)
    hinge        mean(relu(1 - r)) + mean(relu(1 + f))    -mean(f)

vanilla is BCE with logits (softplus(-x) = -log sigmoid(x)): D has no sigmoid, so nothing
saturates in low precision. G's loss

    lambda_adv * adversarial + lambda_pixel * pixel + lambda_chroma * chroma
        + lambda_temporal * temporal

with the pixel loss the mean |pred - target| (l1) or (pred - target)^2 (l2) over a,b (grey
mode) or Lab (line-art mode), all in [-1, 1].

Pixel-only warm-up (`adv_start_step`, DeOldify's NoGAN, VCGAN's first stage): before that
trainer step the adversarial term is left out of G's loss altogether (`adv_weight` is 0; not
multiplied by 0, so a non-finite D output cannot poison it); it is still computed and logged.

Chroma term (`lambda_chroma`), against the desaturated average: where the hue is uncertain,
the pixel loss is lowest near a = b = 0 (L1's median, L2's mean of opposite hues), so G learns
grey-brown. The term is the mean |C(pred) - C(target)| of the chroma magnitude
C = sqrt(a^2 + b^2): it asks for the truth's saturation and is blind to the hue, so a
saturated guess costs nothing more than a grey one where the hue is unknown. It needs no
pretrained network and no statistics of the data. Zhang et al. 2016's class rebalancing
(weights from the train split's histogram of quantized a,b) was the alternative; it needs a
pass over the shards before training and was not done. C's gradient is 0 at exactly a = b = 0
(`colour.CHROMA_EPS`), so at a zero-initialised head this term starts to act once the pixel
loss has moved a,b off zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.blocks import autocast_off
from models.colour import chroma
from models.config import AdvLoss, LossConfig, PixelLoss, check_loss_config, choice


class DLoss(NamedTuple):
    total: Tensor  # what D minimizes: real + fake
    real: Tensor
    fake: Tensor


class GLoss(NamedTuple):
    """G's loss and its terms, each logged by the trainer as Loss/G/<field> (a term that is
    None was not computed this step and is not logged)."""

    total: Tensor  # what G minimizes: the weighted sum of the terms below
    adv: Tensor  # unweighted
    pixel: Tensor  # unweighted
    chroma: Tensor  # unweighted
    temporal: Tensor | None = None  # unweighted; only with lambda_temporal and flow


class GANLoss:
    """The losses of one config. Inputs of any dtype; outputs are fp32 scalars."""

    def __init__(self, cfg: LossConfig):
        check_loss_config(cfg)
        self.adversarial = choice(AdvLoss, cfg.adversarial, "adversarial")
        self.pixel_kind = choice(PixelLoss, cfg.pixel, "pixel")
        self.lambda_pixel = float(cfg.lambda_pixel)
        self.lambda_adv = float(cfg.lambda_adv)
        self.adv_start_step = int(cfg.adv_start_step)
        self.lambda_chroma = float(cfg.lambda_chroma)
        self.lambda_temporal = float(cfg.lambda_temporal)

    def adv_weight(self, step: int | None) -> float:
        """The weight of the adversarial term at trainer step `step` (0-based: the number of
        steps done before this one): 0 during the pixel-only warm-up, else lambda_adv."""
        if step is None:
            if self.adv_start_step:
                raise ValueError("loss.adv_start_step is set: the step must be given "
                                 "(train_step(accelerator, gan, batch, step))")
            return self.lambda_adv
        return 0.0 if step < self.adv_start_step else self.lambda_adv

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> DLoss:
        with autocast_off(real_logits.device.type):
            r, f = real_logits.float(), fake_logits.float()
            if self.adversarial == AdvLoss.lsgan:
                real, fake = (r - 1).square().mean(), f.square().mean()
            elif self.adversarial == AdvLoss.vanilla:
                real = F.binary_cross_entropy_with_logits(r, r.new_ones(()).expand_as(r))
                fake = F.binary_cross_entropy_with_logits(f, f.new_zeros(()).expand_as(f))
            else:  # hinge
                real, fake = F.relu(1 - r).mean(), F.relu(1 + f).mean()
            return DLoss(real + fake, real, fake)

    def g_adv(self, fake_logits: Tensor) -> Tensor:
        with autocast_off(fake_logits.device.type):
            f = fake_logits.float()
            if self.adversarial == AdvLoss.lsgan:
                return (f - 1).square().mean()
            if self.adversarial == AdvLoss.vanilla:
                return F.binary_cross_entropy_with_logits(f, f.new_ones(()).expand_as(f))
            return -f.mean()  # hinge

    def pixel(self, pred: Tensor, target: Tensor) -> Tensor:
        with autocast_off(pred.device.type):
            diff = pred.float() - target.float()
            return diff.abs().mean() if self.pixel_kind == PixelLoss.l1 else diff.square().mean()

    def chroma(self, pred: Tensor, target: Tensor) -> Tensor:
        """mean |C(pred) - C(target)|, C = sqrt(a^2 + b^2), over a,b or Lab in [-1, 1]."""
        with autocast_off(pred.device.type):
            return (chroma(pred.float()) - chroma(target.float())).abs().mean()

    def g_loss(self, fake_logits: Tensor, pred: Tensor, target: Tensor,
               adv_weight: float | None = None,
               previous: tuple[Tensor, Tensor, Tensor] | None = None) -> GLoss:
        """`adv_weight`: the adversarial term's weight (default lambda_adv; see
        `adv_weight()`). `previous`: G's colour of frame t-1 with the flow t -> t-1 and its
        mask (`temporal_loss`), for the temporal term. A term of weight 0 is left out of the
        total, not multiplied by 0."""
        adv_weight = self.lambda_adv if adv_weight is None else adv_weight
        adv, pixel = self.g_adv(fake_logits), self.pixel(pred, target)
        # the chroma term is logged even when off; only then does it build a graph
        chroma = self.chroma(pred if self.lambda_chroma else pred.detach(), target)
        total = self.lambda_pixel * pixel
        if adv_weight:
            total = adv_weight * adv + total
        if self.lambda_chroma:
            total = total + self.lambda_chroma * chroma
        temporal = None
        if self.lambda_temporal and previous is not None:
            temporal = temporal_loss(pred, *previous)
            total = total + self.lambda_temporal * temporal
        return GLoss(total, adv, pixel, chroma, temporal)


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """Frame x [N, C, H, W] seen from the frame a flow [N, 2, H, W] starts in: x sampled
    bilinearly at pixel + flow (x then y, in pixels), the border pixel beyond the edge. The
    temporal loss and the warp error of `metrics/` both use it."""
    _, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=x.dtype),
                            torch.arange(W, device=x.device, dtype=x.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2 / max(W - 1, 1)) - 1  # align_corners=True: pixel centres
    gy = (ys + flow[:, 1]) * (2 / max(H - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def temporal_loss(pred: Tensor, pred_prev: Tensor, flow: Tensor, mask: Tensor) -> Tensor:
    """The occlusion-masked L1 between G's colour for frame t and its colour for frame t-1
    brought to t by the flow t -> t-1 (Lai et al. 2018): mean over visible pixels and
    channels of |pred - warp(pred_prev, flow)|. pred, pred_prev [B, C, H, W]; flow
    [B, 2, H, W] px; mask [B, 1, H, W] (1 where t's pixel is visible in t-1). fp32 scalar."""
    with autocast_off(pred.device.type):
        warped = warp(pred_prev.float(), flow.float())
        mask = mask.float()
        visible = (mask.sum() * pred.shape[1]).clamp(min=1.0)
        return (mask * (pred.float() - warped).abs()).sum() / visible


def build_loss(cfg: LossConfig) -> GANLoss:
    return GANLoss(cfg)
