"""The normalized Lab convention shared by the data loader, G, D and the losses.

Every tensor the networks see lies in [-1, 1]:
    L  in [0, 100]       -> L / 50 - 1
    a, b in [-110, 110]  -> a / 110, b / 110   (sRGB gamut stays within about +-108)
    line art             -> black lines on white, as the second seed draws them:
                            line = -1, background = +1   (inverted Canny map * 2 - 1)
Colour channels are dim -3: [..., C, H, W].
"""

from __future__ import annotations

import torch
from torch import Tensor

L_SCALE = 50.0
AB_SCALE = 110.0


def normalize_lab(lab: Tensor) -> Tensor:
    """Lab in CIE units [..., 3, H, W] -> [-1, 1]."""
    L, ab = lab.split([1, 2], dim=-3)
    return torch.cat([L / L_SCALE - 1.0, ab / AB_SCALE], dim=-3)


def denormalize_lab(x: Tensor) -> Tensor:
    """[-1, 1] [..., 3, H, W] -> Lab in CIE units (for kornia's lab_to_rgb)."""
    L, ab = x.split([1, 2], dim=-3)
    return torch.cat([(L + 1.0) * L_SCALE, ab * AB_SCALE], dim=-3)


def compose_lab(L: Tensor, ab: Tensor) -> Tensor:
    """Grey mode's colour frame: the input L [..., 1, H, W] kept exactly, with G's a,b."""
    return torch.cat([L, ab], dim=-3)


def black_lab_like(x: Tensor) -> Tensor:
    """A black frame (L = 0, a = b = 0) shaped and typed like the Lab frame `x`."""
    black = torch.zeros_like(x)
    black[..., 0, :, :] = -1.0
    return black


# Added under the square root: sqrt's gradient is infinite at 0, and a grey prediction (a = b
# = 0, where a zero-initialised head starts) must not make the chroma loss NaN. 1e-8 moves the
# chroma of grey to 1e-4 (0.011 CIE units), far below anything visible.
CHROMA_EPS = 1e-8


def chroma(x: Tensor) -> Tensor:
    """Chroma magnitude sqrt(a^2 + b^2) [..., 1, H, W] of normalized a,b [..., 2, H, W] or
    Lab [..., 3, H, W]: a,b are the last two colour channels in both."""
    ab = x[..., -2:, :, :]
    return (ab.square().sum(dim=-3, keepdim=True) + CHROMA_EPS).sqrt()
