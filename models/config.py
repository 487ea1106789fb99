"""Settings of the networks (`ModelConfig`) and of the losses (`LossConfig`).

Plain dataclasses, composed by `trainer.config` into the one OmegaConf tree. Enum members are
named exactly as their values, so YAML strings such as `norm: instance` validate. The builders
accept these dataclasses or the DictConfig made from them, and check every value again with
`check_model_config` / `check_loss_config` (a dataclass built in Python is not validated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Mode(str, Enum):
    grey = "grey"  # the 3-frame GAN: L of frames t-1, t, t+1 -> a,b of frame t
    lineart = "lineart"  # TCVC: line art of t + colour of t-1 -> Lab of t


class Norm(str, Enum):
    batch = "batch"  # the seed README's; statistics over all ranks (trainer/sync_batchnorm.py)
    instance = "instance"  # the 3-frame GAN's code; per-sample, so no cross-rank sync needed
    group = "group"  # gcd(32, C) groups; per-sample, safe on CPU and with tiny batches


# `global` is a Python keyword, so this enum is made with the functional API:
# spell its members DHead.patch and DHead["global"] (or just the strings).
DHead = Enum("DHead", [("patch", "patch"), ("global", "global")], type=str)
DHead.__doc__ = "patch: PatchGAN, one logit per 70x70 patch; global: one logit per frame."


class AdvLoss(str, Enum):
    lsgan = "lsgan"  # least squares (Mao et al. 2017), both published systems' choice
    vanilla = "vanilla"  # non-saturating GAN loss, BCE on logits
    hinge = "hinge"  # Lim & Ye 2017 / SAGAN


class PixelLoss(str, Enum):
    l1 = "l1"
    l2 = "l2"


@dataclass
class ModelConfig:
    mode: Mode = Mode.grey
    # Generator (a U-Net).
    ngf: int = 64  # G channels at 1/2 resolution; at 1/2**i: ngf * min(2**(i-1), 8), as the seed
    depth: int = 5  # G down-sampling stages; frame sides must be multiples of 2**depth
    norm: Norm = Norm.batch  # G normalization layers (D has none: spectral norm instead)
    temporal: bool = True  # False: per-frame ablation, G sees frame t only (baselines)
    # Start at grey: the head's a,b outputs get zero weights and bias, so a fresh G outputs
    # a = b = 0 exactly (grey mode: the input's own grey frame; line-art mode: L is still
    # predicted, a,b are 0). Only the initialization changes; a resumed run loads its weights.
    # On by default: +3.1 dB gain over grey on held-out frames against demo_v0 (docs/quality.md)
    zero_init_head: bool = True
    # Discriminator.
    ndf: int = 32  # D channels of its first layer; doubles per stage, capped at 8 * ndf
    d_head: DHead = DHead.patch
    d_conditional: bool = True  # D also sees G's input (pix2pix); False: colour only
    d_temporal: bool = False  # D sees the colour triplet t-1, t, t+1 (vid2vid-style)
    # Colour memory (models/memory.py): G also gets the colour of frame t-1 -- its own
    # previous output, or a keyframe's -- and blends it in through a learned gate. Line-art
    # mode always has it (TCVC); grey mode when `memory` is true.
    memory: bool = False
    # What G gets as the previous colour in training. Per sample, with these probabilities,
    # none (TCVC's scheme, which used 0.5) or G's own prediction of it (scheduled sampling,
    # against drift at inference); else the ground truth (what a keyframe gives).
    p_drop: float = 0.5  # probability in [0, 1]
    scheduled_sampling: float = 0.0  # probability in [0, 1]; p_drop + this <= 1


@dataclass
class LossConfig:
    adversarial: AdvLoss = AdvLoss.lsgan
    pixel: PixelLoss = PixelLoss.l1  # on a,b (grey mode) or Lab (line-art mode), in [-1, 1]
    lambda_pixel: float = 20.0  # weight of the pixel loss in G's loss (the 3-frame GAN: beta = 20)
    lambda_adv: float = 1.0  # weight of the adversarial loss in G's loss (the 3-frame GAN: alpha)
    # Pixel-only warm-up (DeOldify's NoGAN, VCGAN's first stage): G's loss has no adversarial
    # term before this trainer step (the counter of train.max_steps, restored on resume); D
    # trains from step 0 all the same, so it is not a random judge when the term switches on.
    adv_start_step: int = 0  # 0 = adversarial from the first step
    # Against the desaturated average: weight of mean |sqrt(a^2+b^2)(pred) - (target)|, the
    # L1 distance between predicted and true chroma magnitudes, whatever the hue.
    lambda_chroma: float = 0.0  # 0 = off
    # Temporal consistency (shards built with --flow): weight of the occlusion-masked L1
    # between G's colour for frame t and its colour for t-1 warped by the stored flow.
    lambda_temporal: float = 0.0  # 0 = off


def choice(enum_cls: type[Enum], value: object, key: str) -> Enum:
    """`value` (an enum member or its string) as a member of `enum_cls`, else a ValueError."""
    try:
        return enum_cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        names = ", ".join(m.value for m in enum_cls)
        raise ValueError(f"{key}: unknown option {value!r}; expected one of: {names}") from None


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field and the fix for any invalid model setting."""
    for key, enum_cls in (("mode", Mode), ("norm", Norm), ("d_head", DHead)):
        choice(enum_cls, getattr(cfg, key), key)
    # ngf >= 4: the temporal fusion gives each neighbour frame a quarter of the channels
    for key, low in (("ngf", 4), ("ndf", 1), ("depth", 1)):
        if getattr(cfg, key) < low:
            raise ValueError(f"{key}: must be >= {low}, got {getattr(cfg, key)}")
    for key in ("p_drop", "scheduled_sampling"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"{key}: a probability, must lie in [0, 1], got {getattr(cfg, key)}")
    if cfg.p_drop + cfg.scheduled_sampling > 1.0:
        # the two are exclusive per-sample choices, so their sum is a probability too
        raise ValueError(
            f"scheduled_sampling: must be <= 1 - p_drop = {1.0 - cfg.p_drop:g}, got "
            f"{cfg.scheduled_sampling:g}"
        )


def check_loss_config(cfg: LossConfig) -> None:
    choice(AdvLoss, cfg.adversarial, "adversarial")
    choice(PixelLoss, cfg.pixel, "pixel")
    for key in ("lambda_pixel", "lambda_adv", "lambda_chroma", "lambda_temporal"):
        value = getattr(cfg, key)
        if not (value >= 0 and math.isfinite(value)):  # written so that nan fails too
            raise ValueError(f"{key}: a loss weight, must be finite and >= 0, got {value}")
    if cfg.adv_start_step < 0:
        raise ValueError(
            f"adv_start_step: a trainer step, must be >= 0 (0 = no warm-up), got "
            f"{cfg.adv_start_step}"
        )


def has_memory(cfg) -> bool:
    """Whether G takes the previous frame's colour as its second input."""
    return choice(Mode, cfg.mode, "mode") == Mode.lineart or bool(cfg.memory)
