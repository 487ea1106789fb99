"""On-device conversion of decoded RGB triplets into what the models take.

Runs in fp32 whatever the autocast state: Lab in bf16 is off by about 0.5 L.
"""

from __future__ import annotations

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from models.colour import normalize_lab
from shards.flow import STEPS as FLOW_STEPS
from shards.flow import VISIBLE as FLOW_VISIBLE
from shards.flow import ZERO as FLOW_ZERO


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


def line_art(lab: Tensor, low: float, high: float) -> Tensor:
    """Canny edges of the L channel as black lines on white: line -1, background +1.
    lab: normalized Lab [N, 3, H, W] -> [N, 1, H, W] (the second seed's synthetic line art).
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
        return flow, (x[:, :, 2:] >= FLOW_VISIBLE).float()
