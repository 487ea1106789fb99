"""On-device conversion of decoded RGB triplets into what the models take.

Runs in fp32 whatever the autocast state: Lab in bf16 is off by about 0.5 L.
"""

from __future__ import annotations

import kornia
import torch
from torch import Tensor

from models.colour import normalize_lab
from shards.flow import STEPS as FLOW_STEPS
from shards.flow import ZERO as FLOW_ZERO


def rgb_to_lab_triplets(frames: Tensor) -> Tensor:
    """uint8 RGB [B, 3, H, W, 3] (frames t-1, t, t+1, channels last, as DALI gives them)
    -> normalized Lab [B, 3, 3, H, W] in [-1, 1] (`models.colour`), fp32."""
    b, t, h, w, _ = frames.shape
    with torch.autocast(frames.device.type, enabled=False):
        rgb = frames.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w).float() / 255.0
        lab = kornia.color.rgb_to_lab(rgb)
        return normalize_lab(lab).reshape(b, t, 3, h, w)


def line_art(lab: Tensor, low: float, high: float) -> Tensor:
    """Canny edges of the L channel as black lines on white: line -1, background +1.
    lab: normalized Lab [N, 3, H, W] -> [N, 1, H, W] (the second seed's synthetic line art)."""
    with torch.autocast(lab.device.type, enabled=False):
        grey = (lab[:, :1].float() + 1.0) / 2.0  # L in [0, 1]
        _, edges = kornia.filters.canny(grey, low_threshold=low, high_threshold=high)
        return 1.0 - 2.0 * edges


def condition_and_target(
    frames: Tensor, mode: str, canny_low: float = 0.1, canny_high: float = 0.2
) -> tuple[Tensor, Tensor]:
    """uint8 RGB triplets [B, 3, H, W, 3] -> (condition, target), both [B, 3, C, H, W]:
    grey mode: L (C=1) and a,b (C=2); line-art mode: line art (C=1) and Lab (C=3)."""
    lab = rgb_to_lab_triplets(frames)
    if mode == "grey":
        return lab[:, :, :1], lab[:, :, 1:]
    b, t, c, h, w = lab.shape
    edges = line_art(lab.reshape(b * t, c, h, w), canny_low, canny_high)
    return edges.reshape(b, t, 1, h, w), lab


def flow_and_mask(raw: Tensor, mirrored: Tensor) -> tuple[Tensor, Tensor]:
    """The flow members as decoded, cropped and flipped with their frames (uint8 PNG pixels
    [B, 2, H, W, 3]: t -> t-1, t -> t+1; the encoding of shards/flow.py) and whether each
    sample was mirrored [B] -> flow in pixels [B, 2, 2, H, W] (x, y) and mask [B, 2, 1, H, W]
    (1 where the flow holds). Mirroring moved each vector with its pixel; its x component
    changes sign here."""
    with torch.autocast(raw.device.type, enabled=False):
        x = raw.permute(0, 1, 4, 2, 3).float()
        flow = (x[:, :, :2] - FLOW_ZERO) / FLOW_STEPS
        sign = 1.0 - 2.0 * mirrored.float().view(-1, 1, 1, 1)
        flow = torch.stack([flow[:, :, 0] * sign, flow[:, :, 1]], dim=2)
        return flow, (x[:, :, 2:] >= 128).float()
