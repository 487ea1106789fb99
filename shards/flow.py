"""Optical flow stored in the shards (`tricolor-shards build --flow`).

Each sample (frames t-1, t, t+1) gets two members: `flow_prev.png`, the flow from frame t to
t-1, and `flow_next.png`, from t to t+1, each with its occlusion mask: pixel x of frame t is
at x + flow(x) in the other frame, where the mask says it is visible in both.

Computed once, at sharding time, on the frames at shard resolution (a flow network cannot be
downloaded, and a classical flow is too slow for a GPU training loop): OpenCV's DIS (dense
inverse search, preset MEDIUM) on the frames' grey levels, both directions; a pixel is
occluded where the two disagree (forward-backward check, Sundaram et al. 2010, as
`metrics.non_occlusion_mask`).

Stored as 8-bit RGB PNG, losslessly: R, G = 128 + 4 flow (x, y): quarter-pixel steps, within
+-31.75 px per frame; B = 255 where visible, 0 where occluded or the flow is out of range.
Why: the loader decodes them with the decoder, crop window and flip that it uses for the
frames (DALI's, on the GPU), so they cannot come apart; quarter pixels are finer than DIS's
own error (about half a pixel on real footage); and a smooth field compresses well in PNG.
`decode` turns the decoded bytes back into flow and mask.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

METHOD = {"method": "opencv-dis", "preset": "medium", "input": "grey levels (BT.601 luma)",
          "occlusion": "forward-backward: |f + b(x + f)|^2 > 0.01 (|f|^2 + |b(x + f)|^2) + 0.5",
          "format": "png8: RGB = (128 + 4 flow_x, 128 + 4 flow_y, 255 visible / 0 not)"}
MEMBERS = ("flow_prev.png", "flow_next.png")  # t -> t-1, t -> t+1
STEPS = 4.0  # quantization steps per pixel
ZERO = 128
VISIBLE = 128  # B >= this: the flow holds at the pixel (written as 255, 0 where it does not)
LIMIT = (255 - ZERO) / STEPS  # 31.75 px: the largest storable displacement


def grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def dis_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Flow [H, W, 2] float32 from grey frame `a` to grey frame `b`: a(x) ~ b(x + f(x))."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(a, b, None)


def visible(fwd: np.ndarray, bwd: np.ndarray) -> np.ndarray:
    """Where the flow `fwd` (a -> b) is confirmed by `bwd` (b -> a): bool [H, W]."""
    h, w = fwd.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    back = cv2.remap(bwd, xs + fwd[..., 0], ys + fwd[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    total = fwd + back
    bound = 0.01 * ((fwd**2).sum(-1) + (back**2).sum(-1)) + 0.5
    inside = np.isfinite(back).all(-1)
    return inside & ((total**2).sum(-1) <= np.nan_to_num(bound))


def encode(flow: np.ndarray, mask: np.ndarray) -> bytes:
    """flow [H, W, 2] and mask [H, W] -> PNG bytes (module doc). Out of range: not visible."""
    in_range = (np.abs(flow) <= LIMIT).all(-1)
    q = np.clip(np.round(flow * STEPS) + ZERO, 0, 255).astype(np.uint8)
    b = np.where(mask & in_range, 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.dstack([q, b])).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoded PNG pixels [..., 3] uint8 -> (flow [..., 2] float32 px, mask [...] bool)."""
    flow = (rgb[..., :2].astype(np.float32) - ZERO) / STEPS
    return flow, rgb[..., 2] >= VISIBLE


def pair(a_rgb: np.ndarray, b_rgb: np.ndarray) -> tuple[bytes, bytes]:
    """(a -> b, b -> a) as stored members, each with its occlusion mask."""
    a, b = grey(a_rgb), grey(b_rgb)
    fwd, bwd = dis_flow(a, b), dis_flow(b, a)
    return encode(fwd, visible(fwd, bwd)), encode(bwd, visible(bwd, fwd))
