"""Colour maths, in one place: the normalized Lab convention shared by the data loader, G, D
and the losses; RGB <-> Lab; TCVC's synthetic line art; and the full-resolution output frame.

Every tensor the networks see lies in [-1, 1]:
    L  in [0, 100]       -> L / 50 - 1
    a, b in [-110, 110]  -> a / 110, b / 110   (sRGB gamut stays within about +-108)
    line art             -> black lines on white, as TCVC draws them:
                            line = -1, background = +1   (inverted Canny map * 2 - 1)
Colour channels are dim -3: [..., C, H, W].
"""

from __future__ import annotations

import functools

import kornia
import numpy as np
import torch
import torch.nn.functional as F
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


# --- RGB <-> Lab (kornia's sRGB, D65), in fp32 whatever the autocast state: Lab in bf16 is
# off by about 0.5 L ---------------------------------------------------------------------


def rgb_to_lab_triplets(frames: Tensor) -> Tensor:
    """uint8 RGB [B, 3, H, W, 3] (frames t-1, t, t+1, channels last, as DALI gives them)
    -> normalized Lab [B, 3, 3, H, W] in [-1, 1] (`models.colour`), fp32."""
    b, t, h, w, _ = frames.shape
    with torch.autocast(frames.device.type, enabled=False):
        rgb = frames.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w).float() / 255.0
        lab = kornia.color.rgb_to_lab(rgb)
        return normalize_lab(lab).reshape(b, t, 3, h, w)


# Canny's hysteresis rounds: a weak edge pixel joins the line when one of its 8 neighbours is on
# it, so each round reaches one pixel further along a weak chain from its strong pixels. kornia
# repeats rounds until nothing changes, reading `.any()` on the host each round (tens to hundreds
# of syncs per batch, each a stall of the GPU queue); a fixed count needs none. 64 rounds equal
# kornia on every frame sampled from the bundled clips at 128^2 (84 frames of bunny, bikes and
# carphone: 0 pixels differ; the longest chain needed 46 rounds). At 480^2 (33 frames) chains
# run up to 139 rounds: bunny 0 pixels differ, carphone 1.9e-5 of the pixels, bikes 7.5e-5 (at
# most 6.3e-4 in one frame), i.e. the far ends of a few weak chains are left out.
HYSTERESIS_ROUNDS = 64
# Canny's hysteresis thresholds on gradients of L in [0, 1]: data.canny_low/high's defaults
CANNY_LOW, CANNY_HIGH = 0.1, 0.2


def line_art(lab: Tensor, low: float, high: float) -> Tensor:
    """Canny edges of the L channel as black lines on white: line -1, background +1.
    lab: normalized Lab [N, 3, H, W] -> [N, 1, H, W] (TCVC's synthetic line art).
    Hysteresis runs `HYSTERESIS_ROUNDS` rounds, with no host sync."""
    with torch.autocast(lab.device.type, enabled=False):
        grey = (lab[:, :1].float() + 1.0) / 2.0  # L in [0, 1]
        # edges: 1 strong (above high), 0.5 weak (above low only), 0 none
        _, edges = kornia.filters.canny(grey, low_threshold=low, high_threshold=high,
                                        hysteresis=False)
        candidate = (edges > 0).float()  # weak or strong: where a line may run
        line = (edges == 1).float()
        for _ in range(HYSTERESIS_ROUNDS):  # line stays within candidate, so this only grows
            line = F.max_pool2d(line, 3, stride=1, padding=1) * candidate
        return 1.0 - 2.0 * line


def lab_to_rgb(lab: Tensor) -> Tensor:
    """Normalized Lab [..., 3, H, W] -> RGB in [0, 1], fp32."""
    shape = lab.shape
    rgb = kornia.color.lab_to_rgb(denormalize_lab(lab.float().reshape(-1, *shape[-3:])))
    return rgb.clamp(0, 1).reshape(shape)


def rgb_to_cielab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] [..., 3, H, W] -> CIELAB (D65) in CIE units, fp32 (kornia, as the data
    pipeline converts)."""
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        return kornia.color.rgb_to_lab(rgb.float().clamp(0, 1))



# --- full-resolution output frames (tricolor-colorize, tricolor-eval) ----------------------

# The Y row of kornia's sRGB (D65) -> XYZ matrix: luminance from linear RGB.
LUMINANCE = (0.212671, 0.715160, 0.072169)


def to_uint8(rgb: Tensor) -> np.ndarray:
    """RGB [3, H, W] in [0, 1] -> uint8 [H, W, 3] on the host."""
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def resize(x: Tensor, height: int, width: int) -> Tensor:
    """[C, h, w] -> [C, height, width], bilinear (area-weighted where it shrinks)."""
    if x.shape[-2:] == (height, width):
        return x.float()
    return F.interpolate(x[None].float(), (height, width), mode="bilinear",
                         align_corners=False, antialias=True)[0]


@functools.lru_cache(maxsize=4)
def _srgb_to_linear_lut(device: torch.device) -> Tensor:
    """kornia's sRGB -> linear RGB of the 256 8-bit levels, to index with uint8 frames."""
    levels = (torch.arange(256, device=device, dtype=torch.float32) / 255).view(1, 256, 1)
    return kornia.color.rgb_to_linear_rgb(levels.expand(3, -1, -1))[0, :, 0]


@torch.inference_mode()
def compose_grey(rgb: np.ndarray, ab: Tensor) -> np.ndarray:
    """The input frame's full-resolution luminance with G's chroma.

    rgb: uint8 [H, W, 3] (its L is kept); ab: normalized a,b [2, h, w] at the working
    resolution (zeros: the greyscale frame itself). The colour (L, a, b) goes to XYZ as
    kornia's `lab_to_rgb` takes it (same constants), except that Y is the input's own
    luminance rather than one recomputed from L. Out-of-gamut colours are then pulled
    towards the grey of the same luminance along a line in linear RGB, Y + s (c - Y), with
    the largest s in [0, 1] that fits: Y, hence L, is unchanged.
    """
    device = ab.device
    lin = _srgb_to_linear_lut(device)[torch.from_numpy(rgb).to(device).long()]  # [H, W, 3]
    Y = lin @ torch.tensor(LUMINANCE, device=device)  # [H, W]
    H, W = Y.shape
    a, b = (resize(ab, H, W) * AB_SCALE).unbind(0)
    # kornia's Lab: f(t) = t^(1/3) above 0.008856, else 7.787 t + 4/29; L = 116 f(Y) - 16.
    fy = torch.where(Y > 0.008856, Y.clamp(min=0.008856).pow(1 / 3), 7.787 * Y + 4 / 29)
    fxz = torch.stack([fy + a / 500, (fy - b / 200).clamp(min=0)])
    x, z = torch.where(fxz > 0.2068966, fxz.pow(3), (fxz - 4 / 29) / 7.787).unbind(0)
    xyz = torch.stack([x * 0.95047, Y, z * 1.08883])
    d = kornia.color.xyz_to_rgb(xyz) - Y  # [3, H, W], linear RGB minus the grey
    inf = torch.full_like(d, float("inf"))
    room = torch.where(d > 0, (1 - Y) / d.clamp(min=1e-12),
                       torch.where(d < 0, Y / (-d).clamp(min=1e-12), inf))
    s = room.amin(dim=0).clamp(max=1)
    return to_uint8(kornia.color.linear_rgb_to_rgb((Y + s * d).clamp(0, 1)))


@torch.inference_mode()
def lab_to_uint8(lab: Tensor, height: int, width: int) -> np.ndarray:
    """G's normalized Lab [3, h, w] -> RGB uint8 [height, width, 3] (line-art mode)."""
    return to_uint8(lab_to_rgb(resize(lab, height, width)))
