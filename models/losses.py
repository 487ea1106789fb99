"""GAN losses on D's logits, and the pixel loss; always computed in fp32.

With r = D(real) and f = D(fake) logits, means over every logit (patch or frame):

    adversarial  D loss (real part + fake part)          G loss
    lsgan        mean((r - 1)^2) + mean(f^2)              mean((f - 1)^2)
    vanilla      mean(softplus(-r)) + mean(softplus(f))   mean(softplus(-f))   (non-saturating)
    hinge        mean(relu(1 - r)) + mean(relu(1 + f))    -mean(f)

vanilla is BCE with logits (softplus(-x) = -log sigmoid(x)): D has no sigmoid, so nothing
saturates in low precision. G's loss = lambda_adv * adversarial + lambda_pixel * pixel, the
pixel loss being the mean |pred - target| (l1) or (pred - target)^2 (l2) over a,b (grey
mode) or Lab (line-art mode), all in [-1, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from models.blocks import autocast_off
from models.config import AdvLoss, LossConfig, PixelLoss, check_loss_config, choice


class DLoss(NamedTuple):
    total: Tensor  # what D minimizes: real + fake
    real: Tensor
    fake: Tensor


class GLoss(NamedTuple):
    total: Tensor  # what G minimizes: lambda_adv * adv + lambda_pixel * pixel
    adv: Tensor  # unweighted
    pixel: Tensor  # unweighted


class GANLoss:
    """The losses of one config. Inputs of any dtype; outputs are fp32 scalars."""

    def __init__(self, cfg: LossConfig):
        check_loss_config(cfg)
        self.adversarial = choice(AdvLoss, cfg.adversarial, "adversarial")
        self.pixel_kind = choice(PixelLoss, cfg.pixel, "pixel")
        self.lambda_pixel = float(cfg.lambda_pixel)
        self.lambda_adv = float(cfg.lambda_adv)

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

    def g_loss(self, fake_logits: Tensor, pred: Tensor, target: Tensor) -> GLoss:
        adv, pixel = self.g_adv(fake_logits), self.pixel(pred, target)
        return GLoss(self.lambda_adv * adv + self.lambda_pixel * pixel, adv, pixel)


def build_loss(cfg: LossConfig) -> GANLoss:
    return GANLoss(cfg)
