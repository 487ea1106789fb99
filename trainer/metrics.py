"""Validation metrics, reduced across ranks by torchmetrics: PSNR, SSIM, CDC and warp error.

The definitions are those of `../shared/docs/metrics.md`; the conventions it leaves open:

- A *clip* is one batch item: T consecutive frames [T, 3, H, W] (T = 3 in validation). Every
  metric is computed per clip, then averaged over clips. Only sums and counts are kept as state
  (`dist_reduce_fx="sum"`), so the mean over N ranks equals the mean of one process over the
  same clips, however unevenly the clips are split; a mean of per-rank means would not.
- PSNR of a clip: torchmetrics' `peak_signal_noise_ratio(data_range=1.0)` over all of the clip's
  frames, channels and pixels at once (10 log10(1 / MSE of the clip)), capped at
  `PSNR_CAP_DB`: identical clips (MSE 0, e.g. a fade to black) would otherwise give +inf,
  which swamps the mean and is not valid JSON for `metrics.jsonl`.
- SSIM of a clip: the mean over its frames of torchmetrics'
  `structural_similarity_index_measure(data_range=1.0)` (Gaussian window 11, sigma 1.5).
- CDC: 8-bit RGB is round(255 x) of the [0, 1] input, clamped; one 256-bin histogram per frame
  and channel. metrics.md averages the dilations {1, 2, 4}; a dilation d >= T has no frame pair
  in a T-frame clip, so the average runs over the dilations d < T ({1, 2} for T = 3). Values
  from 3-frame clips are therefore not comparable with published whole-video CDC.
- Warp error: flow between consecutive grey frames (uint8 = round(255 grey)) with Farnebäck,
  both directions; the non-occlusion mask exactly as metrics.md writes it, with forward
  differences for the flow gradient (zero in the last row / column, as in Lai et al.'s code);
  bilinear sampling with border replication for positions outside the frame (such pixels are
  not masked unless the check marks them). A pair whose mask is empty is skipped; a clip with
  no valid pair does not count towards the warp means (`warp_clips`).
- `*_truth` are the same metrics on the ground truth (with the same flows): the floor that real
  motion alone gives. `warp_excess = warp - warp_truth`.

Everything is computed in fp32 outside autocast; states are fp64 sums and int64 counts.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

PSNR_CAP_DB = 100.0
CDC_DILATIONS = (1, 2, 4)
# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations,
# poly_n, poly_sigma, flags), as metrics.md fixes them.
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def clip_psnr(pred: Tensor, truth: Tensor) -> Tensor:
    """PSNR in dB of each clip [B, T, C, H, W] in [0, 1] -> [B], capped at `PSNR_CAP_DB`."""
    psnr = peak_signal_noise_ratio(pred, truth, data_range=1.0, reduction="none",
                                   dim=tuple(range(1, pred.ndim)))
    return psnr.clamp(max=PSNR_CAP_DB)


def clip_ssim(pred: Tensor, truth: Tensor) -> Tensor:
    """SSIM of each clip [B, T, 3, H, W] in [0, 1] (the mean over its frames) -> [B]."""
    ssim = structural_similarity_index_measure(pred.flatten(0, 1), truth.flatten(0, 1),
                                               data_range=1.0, reduction="none")
    return ssim.view(pred.shape[:2]).mean(dim=1)


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] -> 8-bit levels round(255 x), as int64."""
    return (x.clamp(0, 1) * 255).round().long()


def histograms(video: Tensor) -> Tensor:
    """P_c(O_t): [..., C, H, W] in [0, 1] -> [..., C, 256], each row summing to 1."""
    *lead, H, W = video.shape
    levels = to_uint8(video).flatten(-2)  # [..., C, HW]
    rows = levels.flatten(0, -2).shape[0]
    offsets = torch.arange(rows, device=video.device).view(*lead, 1) * 256
    counts = torch.bincount((levels + offsets).flatten(), minlength=rows * 256)
    return counts.view(*lead, 256).float() / (H * W)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence in nats over the last dim (0 log 0 = 0), in [0, ln 2]."""
    m = (p + q) / 2

    def kl_to_m(a: Tensor) -> Tensor:  # where a > 0, m > 0 too
        return torch.where(a > 0, a * (a / m).log(), torch.zeros_like(a)).sum(dim=-1)

    return (kl_to_m(p) + kl_to_m(q)) / 2


def clip_cdc(video: Tensor) -> Tensor:
    """CDC of each clip [B, T, 3, H, W] in [0, 1] -> [B], over the dilations d < T."""
    T = video.shape[1]
    dilations = [d for d in CDC_DILATIONS if d < T]
    assert dilations, "CDC needs at least two frames"
    hist = histograms(video)  # [B, T, 3, 256]
    # JS over the pairs (i, i + d), mean over i: CDC_{c,d} [B, 3]; mean over d, then over c.
    per_dilation = [js_divergence(hist[:, :-d], hist[:, d:]).mean(dim=1) for d in dilations]
    return torch.stack(per_dilation).mean(dim=0).mean(dim=-1)


def farneback_flows(grey: Tensor) -> tuple[Tensor, Tensor]:
    """Forward (t -> t+1) and backward (t+1 -> t) Farnebäck flow between consecutive frames.

    grey [B, T, 1, H, W] in [0, 1] -> two [B, T-1, 2, H, W] fp32 tensors on grey's device,
    channel 0 = dx, 1 = dy in pixels: frame t at x matches frame t+1 at x + F_f(x).
    """
    frames = to_uint8(grey[:, :, 0]).to(torch.uint8).cpu().numpy()  # [B, T, H, W]
    fwd, bwd = [], []
    for clip in frames:
        for a, b in zip(clip[:-1], clip[1:], strict=True):
            fwd.append(cv2.calcOpticalFlowFarneback(a, b, None, *FARNEBACK))
            bwd.append(cv2.calcOpticalFlowFarneback(b, a, None, *FARNEBACK))
    B, T, _, H, W = grey.shape

    def stack(flows: list[np.ndarray]) -> Tensor:
        flow = torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2)  # [N, 2, H, W]
        return flow.reshape(B, T - 1, 2, H, W).to(grey.device, torch.float32)

    return stack(fwd), stack(bwd)


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """x [N, C, H, W] sampled bilinearly at (pixel + flow) on x's grid; flow [N, 2, H, W]."""
    _, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=x.dtype),
                            torch.arange(W, device=x.device, dtype=x.dtype), indexing="ij")
    gx = (xs + flow[:, 0]) * (2 / max(W - 1, 1)) - 1  # align_corners=True: pixel centres
    gy = (ys + flow[:, 1]) * (2 / max(H - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


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


class ColorizationMetrics(Metric):
    """PSNR, SSIM, CDC and warp error of colorized clips, with the ground-truth floors.

    `update(pred, truth, grey)`: pred and truth are RGB in [0, 1], [B, T, 3, H, W], each batch
    item T consecutive frames of one clip (T >= 2); grey [B, T, 1, H, W] in [0, 1] is the
    greyscale input, from which the flow is computed. `compute()` (synced across ranks by
    torchmetrics) returns floats: psnr (dB), ssim, cdc, cdc_truth, warp, warp_truth,
    warp_excess; the means over clips described in the module docstring (NaN with no clips).
    """

    is_differentiable = False
    higher_is_better = None  # mixed: psnr/ssim up, the rest down
    full_state_update = False

    SUMS = ("psnr", "ssim", "cdc", "cdc_truth", "warp", "warp_truth")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.SUMS:
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.add_state("clips", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("warp_clips", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, truth: Tensor, grey: Tensor) -> None:
        if pred.ndim != 5 or pred.shape[2] != 3 or pred.shape != truth.shape:
            raise ValueError(f"pred and truth must both be RGB [B, T, 3, H, W]; got "
                             f"{tuple(pred.shape)} and {tuple(truth.shape)}")
        if grey.shape != (*pred.shape[:2], 1, *pred.shape[3:]):
            raise ValueError(f"grey must be [B, T, 1, H, W] matching pred {tuple(pred.shape)}; "
                             f"got {tuple(grey.shape)}")
        if pred.shape[1] < 2:
            raise ValueError(f"temporal metrics need clips of T >= 2 frames; got T = "
                             f"{pred.shape[1]}")
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, truth, grey = pred.float(), truth.float(), grey.float()
            fwd, bwd = farneback_flows(grey)
            mask = non_occlusion_mask(fwd.flatten(0, 1), bwd.flatten(0, 1))
            mask = mask.view(*fwd.shape[:2], *mask.shape[-2:])
            warp_pred, valid = clip_warp_error(pred, fwd, mask)
            warp_truth, _ = clip_warp_error(truth, fwd, mask)  # same masks: same validity
            per_clip = {"psnr": clip_psnr(pred, truth), "ssim": clip_ssim(pred, truth),
                        "cdc": clip_cdc(pred), "cdc_truth": clip_cdc(truth),
                        "warp": warp_pred * valid, "warp_truth": warp_truth * valid}
        for name, values in per_clip.items():
            state = getattr(self, f"{name}_sum")
            setattr(self, f"{name}_sum", state + values.sum().to(state))
        self.clips += pred.shape[0]
        self.warp_clips += valid.sum().to(self.warp_clips)

    def compute(self) -> dict[str, float]:
        out = {}
        for name in self.SUMS:
            count = self.warp_clips if name.startswith("warp") else self.clips
            out[name] = (getattr(self, f"{name}_sum") / count).item()
        out["warp_excess"] = out["warp"] - out["warp_truth"]
        return out
