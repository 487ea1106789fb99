"""Decoded triplets and flow members -> what the step takes (colour maths: models/colour.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from models.colour import CANNY_HIGH, CANNY_LOW, line_art, rgb_to_lab_triplets
from shards.flow import STEPS as FLOW_STEPS
from shards.flow import VISIBLE as FLOW_VISIBLE
from shards.flow import ZERO as FLOW_ZERO


def condition_and_target(
    frames: Tensor, mode: str, canny_low: float = CANNY_LOW, canny_high: float = CANNY_HIGH,
    to_lab=rgb_to_lab_triplets,
) -> tuple[Tensor, Tensor]:
    """uint8 RGB triplets [B, 3, H, W, 3] -> (condition, target), both [B, 3, C, H, W]:
    grey mode: L (C=1) and a,b (C=2); line-art mode: line art (C=1) and Lab (C=3).
    `to_lab`: the RGB -> normalized Lab conversion (bench/data.py compares another one)."""
    lab = to_lab(frames)
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
        return flow, (x[:, :, 2:] >= FLOW_VISIBLE).float()
