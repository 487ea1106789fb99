"""The warp error: Farnebäck flow on the grey input, the non-occlusion mask, the masked error."""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np
import torch
from torch import Tensor

from metrics.clip import to_uint8
from models.losses import warp  # one warp for the warp error and the temporal loss

# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations,
# poly_n, poly_sigma, flags), as Lai et al.'s offline warp error fixes them.
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


@functools.cache
def _share_cv2_threads() -> None:
    """Once per process: OpenCV's thread pool takes every core by default, and the ranks of a
    node all compute Farnebäck flow at once in validation; give each rank its share of the
    cores this process may run on (its affinity: what Slurm's binding leaves it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cv2.setNumThreads(max(1, (cores or 1) // local_world))


def farneback_flows(grey: Tensor, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Forward (t -> t+1) and backward (t+1 -> t) Farnebäck flow between consecutive frames.

    grey [B, T, 1, H, W] in [0, 1] -> two [B, T-1, 2, H, W] fp32 tensors on `device` (default:
    grey's), channel 0 = dx, 1 = dy in pixels: frame t at x matches frame t+1 at x + F_f(x).
    """
    _share_cv2_threads()
    frames = to_uint8(grey[:, :, 0]).to(torch.uint8).cpu().numpy()  # [B, T, H, W]
    fwd, bwd = [], []
    for clip in frames:
        for a, b in zip(clip[:-1], clip[1:], strict=True):
            fwd.append(cv2.calcOpticalFlowFarneback(a, b, None, *FARNEBACK))
            bwd.append(cv2.calcOpticalFlowFarneback(b, a, None, *FARNEBACK))
    B, T, _, H, W = grey.shape

    def stack(flows: list[np.ndarray]) -> Tensor:
        flow = torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2)  # [N, 2, H, W]
        return flow.reshape(B, T - 1, 2, H, W).to(device or grey.device, torch.float32)

    return stack(fwd), stack(bwd)


def non_occlusion_mask(fwd: Tensor, bwd: Tensor) -> Tensor:
    """M_t [N, H, W] (1 = valid) from the forward-backward check of metrics.md; flows [N, 2, H, W].

    Occluded where |F_f + F~_b|^2 > 0.01 (|F_f|^2 + |F~_b|^2) + 0.5 (F~_b: F_b sampled at
    x + F_f(x)), or at motion boundaries |grad u|^2 + |grad v|^2 > 0.01 |F_f|^2 + 0.002.
    """
    bwd_w = warp(bwd, fwd)
    sq = lambda f: f.pow(2).sum(dim=1)  # noqa: E731
    inconsistent = sq(fwd + bwd_w) > 0.01 * (sq(fwd) + sq(bwd_w)) + 0.5
    dx = torch.zeros_like(fwd)
    dy = torch.zeros_like(fwd)
    dx[..., :, :-1] = fwd[..., :, 1:] - fwd[..., :, :-1]
    dy[..., :-1, :] = fwd[..., 1:, :] - fwd[..., :-1, :]
    boundary = sq(dx) + sq(dy) > 0.01 * sq(fwd) + 0.002
    return (~(inconsistent | boundary)).float()


def clip_warp_error(video: Tensor, fwd: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """E_warp of each clip [B, T, 3, H, W] in [0, 1] given the flows [B, T-1, 2, H, W] and the
    masks [B, T-1, H, W] -> (error [B], valid [B]): the mean of E_pair over the pairs with a
    non-empty mask; a clip is valid when it has at least one such pair (else its error is 0)."""
    B, P = fwd.shape[:2]
    warped = warp(video[:, 1:].flatten(0, 1), fwd.flatten(0, 1)).view(B, P, *video.shape[2:])
    sq_err = (video[:, :-1] - warped).pow(2).sum(dim=2)  # [B, P, H, W]
    area = mask.sum(dim=(-2, -1))
    e_pair = (mask * sq_err).sum(dim=(-2, -1)) / (3 * area.clamp(min=1))
    pair_ok = area > 0
    pairs = pair_ok.sum(dim=1)
    return (e_pair * pair_ok).sum(dim=1) / pairs.clamp(min=1), pairs > 0


def stored_warp_error(video: Tensor, flow: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """E_warp of triplets [B, 3, 3, H, W] (t-1, t, t+1) with the flow stored in the shards:
    flow [B, 2, 2, H, W] from t to t-1 and to t+1, mask [B, 2, 1, H, W]. Each pair is seen
    from frame t (frame t against the other frame warped to t), as `clip_warp_error` sees a
    pair from its first frame -> (error [B], valid [B])."""
    B = video.shape[0]
    pairs = torch.stack([video[:, [1, 0]], video[:, [1, 2]]], dim=1).flatten(0, 1)
    err, valid = clip_warp_error(pairs, flow.flatten(0, 1)[:, None].float(),
                                 mask.flatten(0, 1).float())
    err, valid = err.view(B, 2), valid.view(B, 2)
    return (err * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1), valid.any(dim=1)
