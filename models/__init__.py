"""tricolor models: generators, discriminators and losses, built from the config.

    G = build_generator(cfg.model)       # GreyUNet or LineartUNet
    D = build_discriminator(cfg.model)   # PatchDiscriminator or GlobalDiscriminator
    loss = build_loss(cfg.loss)          # GANLoss: d_loss, g_loss, pixel, chroma, adv_weight
    d_in = assemble_d_input(cfg.model, condition, colour, target)

`python -m models.summary` prints shapes, parameter counts and receptive fields.
"""

from models.colour import black_lab_like, chroma, compose_lab, denormalize_lab, normalize_lab
from models.config import (
    AdvLoss,
    DHead,
    LossConfig,
    Mode,
    ModelConfig,
    Norm,
    PixelLoss,
    has_memory,
)
from models.discriminator import assemble_d_input, build_discriminator, d_in_channels
from models.generator import build_generator
from models.losses import DLoss, GANLoss, GLoss, build_loss
from models.memory import memory_of, no_memory_like, previous_colour

__all__ = [
    "AdvLoss",
    "DHead",
    "DLoss",
    "GANLoss",
    "GLoss",
    "LossConfig",
    "Mode",
    "ModelConfig",
    "Norm",
    "PixelLoss",
    "assemble_d_input",
    "black_lab_like",
    "build_discriminator",
    "build_generator",
    "build_loss",
    "chroma",
    "compose_lab",
    "d_in_channels",
    "has_memory",
    "denormalize_lab",
    "normalize_lab",
    "memory_of",
    "no_memory_like",
    "previous_colour",
]
