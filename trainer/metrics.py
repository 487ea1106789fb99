"""Colorization metrics: PSNR, SSIM, CDC and warp error (validation, reduced across ranks by
torchmetrics), colourfulness and CIEDE2000, and whole-video scores for `tricolor-eval`.

The definitions follow the papers named at each metric; the conventions they leave open:

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
- `*_grey` are PSNR and SSIM of a baseline colorization of the same clips (validation passes
  zero chroma: the truth's L with a = b = 0), and `psnr_gain = psnr - psnr_grey`: what the
  model knows about colour that a grey frame does not. The gain is a difference of the two
  means over the same clips.
- Colourfulness (`colourfulness` below) of a clip: the mean of M over its frames;
  `colourfulness` of the prediction, `colourfulness_truth` of the ground truth.

Everything is computed in fp32 outside autocast; states are fp64 sums and int64 counts.

`VideoScores` (tricolor-eval) applies the same functions to whole videos streamed frame by
frame (a video is one clip: CDC over the dilations {1, 2, 4}), and adds colourfulness (mean
over frames, |dM| of the means) and the mean CIEDE2000; see its docstring.
"""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from models.colour import rgb_to_cielab
from models.losses import warp  # one warp for the warp error and the temporal loss

PSNR_CAP_DB = 100.0
CDC_DILATIONS = (1, 2, 4)
# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations,
# poly_n, poly_sigma, flags), as metrics.md fixes them.
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)
# Host memory that one ColorizationMetrics may hold in cached Farnebäck flows (per process, so
# per rank): 32 H W bytes per triplet (7.4 MB at 480^2), so 1 GiB holds ~145 such samples. Once
# full, the flows of further samples are computed at every validation and not kept; the samples
# cached are the first ones seen (the val loader's order is fixed), the same at every validation.
FLOW_CACHE_BYTES = 1 << 30


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
    index = (levels + offsets).flatten()
    # A scatter into a fixed number of bins: torch.bincount on CUDA reads the largest index on
    # the host to size its output (a sync per call).
    counts = torch.zeros(rows * 256, dtype=torch.int64, device=video.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
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


class ColorizationMetrics(Metric):
    """PSNR, SSIM, CDC and warp error of colorized clips, with the ground-truth floors.

    `update(pred, truth, grey, baseline)`: pred, truth and baseline are RGB in [0, 1],
    [B, T, 3, H, W], each batch item T consecutive frames of one clip (T >= 2); grey
    [B, T, 1, H, W] in [0, 1] is the greyscale input, from which the flow is computed;
    baseline is the reference colorization the model is compared with (zero chroma).
    `compute()` (synced across ranks by torchmetrics) returns floats: psnr (dB), psnr_grey,
    psnr_gain, ssim, ssim_grey, cdc, cdc_truth, warp, warp_truth, warp_excess, colourfulness,
    colourfulness_truth; the means over clips described in the module docstring (NaN with no
    clips).

    Farnebäck flow (when no stored flow is given) is computed on the CPU, the slow part of a
    validation at large crops. Given `keys` (the batch's
    sample keys), the flows of each sample are computed once and kept, on the host, for later
    updates and validations: they depend only on the sample's grey frames, which are the same
    at every validation (centre crop, no flip or jitter: trainer/validate.py). A sample costs
    16 (T-1) H W bytes, 7.4 MB for a 480^2 triplet; the cache holds at most `flow_cache_bytes`
    (default `FLOW_CACHE_BYTES`) of them, first come first kept: once full, the flows of
    further samples are computed at every update and dropped. `reset()` keeps the cache.
    """

    is_differentiable = False
    higher_is_better = None  # mixed: psnr/ssim up, the rest down
    full_state_update = False

    SUMS = ("psnr", "psnr_grey", "ssim", "ssim_grey", "cdc", "cdc_truth", "warp", "warp_truth",
            "colourfulness", "colourfulness_truth")

    def __init__(self, flow_cache_bytes: int = FLOW_CACHE_BYTES, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.SUMS:
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.add_state("clips", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("warp_clips", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.flow_cache: dict[str, tuple[Tensor, Tensor]] = {}  # key -> CPU (fwd, bwd)
        self.flow_cache_bytes = flow_cache_bytes  # the budget
        self.flow_cache_used = 0  # bytes held in flow_cache

    def update(self, pred: Tensor, truth: Tensor, grey: Tensor, baseline: Tensor,
               flow: tuple[Tensor, Tensor] | None = None, keys: list[str] | None = None) -> None:
        """`flow`: (flow, mask) stored in the shards for these triplets (`Batch.flow`,
        `Batch.flow_mask`): the warp error uses them (`stored_warp_error`) instead of
        computing Farnebäck flow on the CPU. `keys`: one per clip, naming clips whose grey
        frames are the same whenever the key comes again (`Batch.keys` in validation): their
        Farnebäck flows are cached; None computes them afresh."""
        if pred.ndim != 5 or pred.shape[2] != 3 or not pred.shape == truth.shape == baseline.shape:
            raise ValueError(f"pred, truth and baseline must all be RGB [B, T, 3, H, W]; got "
                             f"{tuple(pred.shape)}, {tuple(truth.shape)} and "
                             f"{tuple(baseline.shape)}")
        if grey.shape != (*pred.shape[:2], 1, *pred.shape[3:]):
            raise ValueError(f"grey must be [B, T, 1, H, W] matching pred {tuple(pred.shape)}; "
                             f"got {tuple(grey.shape)}")
        if pred.shape[1] < 2:
            raise ValueError(f"temporal metrics need clips of T >= 2 frames; got T = "
                             f"{pred.shape[1]}")
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, truth, grey, baseline = (x.float() for x in (pred, truth, grey, baseline))
            if flow is not None and pred.shape[1] == 3:
                warp_pred, valid = stored_warp_error(pred, *flow)
                warp_truth, _ = stored_warp_error(truth, *flow)
            else:
                fwd, bwd = self.cached_flows(grey, keys)
                mask = non_occlusion_mask(fwd.flatten(0, 1), bwd.flatten(0, 1))
                mask = mask.view(*fwd.shape[:2], *mask.shape[-2:])
                warp_pred, valid = clip_warp_error(pred, fwd, mask)
                warp_truth, _ = clip_warp_error(truth, fwd, mask)  # same masks and validity
            per_clip = {"psnr": clip_psnr(pred, truth), "ssim": clip_ssim(pred, truth),
                        "psnr_grey": clip_psnr(baseline, truth),
                        "ssim_grey": clip_ssim(baseline, truth),
                        "cdc": clip_cdc(pred), "cdc_truth": clip_cdc(truth),
                        "warp": warp_pred * valid, "warp_truth": warp_truth * valid,
                        "colourfulness": colourfulness(pred).mean(dim=1),
                        "colourfulness_truth": colourfulness(truth).mean(dim=1)}
        for name, values in per_clip.items():
            state = getattr(self, f"{name}_sum")
            setattr(self, f"{name}_sum", state + values.sum().to(state))
        self.clips += pred.shape[0]
        self.warp_clips += valid.sum().to(self.warp_clips)

    def cached_flows(self, grey: Tensor, keys: list[str] | None) -> tuple[Tensor, Tensor]:
        """`farneback_flows(grey)`, computed only for the keys not in the cache; those computed
        are cached while the budget allows (in batch order)."""
        if keys is None:
            return farneback_flows(grey)
        if len(keys) != grey.shape[0]:
            raise ValueError(f"{len(keys)} keys for {grey.shape[0]} clips")
        new = [i for i, key in enumerate(keys)  # a padded batch may repeat a key
               if key not in self.flow_cache and key not in keys[:i]]
        computed: dict[str, tuple[Tensor, Tensor]] = {}
        if new:
            fwd, bwd = farneback_flows(grey[new], device=torch.device("cpu"))
            for i, f, b in zip(new, fwd, bwd, strict=True):
                size = f.nbytes + b.nbytes
                if self.flow_cache_used + size <= self.flow_cache_bytes:
                    # clones: views would keep the whole batch's flows alive
                    self.flow_cache[keys[i]] = (f.clone(), b.clone())
                    self.flow_cache_used += size
                else:
                    computed[keys[i]] = (f, b)
        flows = [self.flow_cache[key] if key in self.flow_cache else computed[key]
                 for key in keys]
        fwd, bwd = (torch.stack(x).to(grey.device) for x in zip(*flows, strict=True))
        return fwd, bwd

    def compute(self) -> dict[str, float]:
        mean = {}
        for name in self.SUMS:
            count = self.warp_clips if name.startswith("warp") else self.clips
            mean[name] = (getattr(self, f"{name}_sum") / count).item()
        derived = {"psnr_gain": mean["psnr"] - mean["psnr_grey"],
                   "warp_excess": mean["warp"] - mean["warp_truth"]}
        order = ("psnr", "psnr_grey", "psnr_gain", "ssim", "ssim_grey", "cdc", "cdc_truth",
                 "warp", "warp_truth", "warp_excess", "colourfulness", "colourfulness_truth")
        return {name: (mean | derived)[name] for name in order}


# --- colourfulness and CIEDE2000 -----------------------------------------------------------
# Conventions: both take RGB in [0, 1] (as everything above); colourfulness scales it to
# [0, 255] without rounding; CIEDE2000 converts sRGB (D65) to CIELAB with kornia, the same
# conversion as the data pipeline, and is computed in fp64.


def colourfulness(rgb: Tensor) -> Tensor:
    """Hasler & Süsstrunk's M of each image [..., 3, H, W] RGB in [0, 1] -> [...] (fp64).

    On [0, 255]: rg = R - G, yb = (R + G) / 2 - B (signed); sigma = sqrt(var rg + var yb)
    (population variances over the pixels), mu = sqrt(mean rg^2 + mean yb^2),
    M = sigma + 0.3 mu.
    """
    R, G, B = (rgb.double() * 255).unbind(dim=-3)
    rg, yb = (R - G).flatten(-2), ((R + G) / 2 - B).flatten(-2)
    sigma = (rg.var(dim=-1, unbiased=False) + yb.var(dim=-1, unbiased=False)).sqrt()
    mu = (rg.mean(dim=-1).square() + yb.mean(dim=-1).square()).sqrt()
    return sigma + 0.3 * mu


def ciede2000(lab1: Tensor, lab2: Tensor) -> Tensor:
    """CIEDE2000 colour difference (Sharma, Wu & Dalal 2005; k_L = k_C = k_H = 1) between
    CIELAB images in CIE units [..., 3, H, W] -> [..., H, W], computed in fp64."""
    L1, a1, b1 = lab1.double().unbind(dim=-3)
    L2, a2, b2 = lab2.double().unbind(dim=-3)
    c_bar7 = ((a1.hypot(b1) + a2.hypot(b2)) / 2).pow(7)
    g = 0.5 * (1 - (c_bar7 / (c_bar7 + 25.0**7)).sqrt())
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = a1p.hypot(b1), a2p.hypot(b2)
    # Hue angles in degrees in [0, 360); atan2(0, 0) = 0, as the paper sets it.
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360
    chroma_zero = (c1p * c2p) == 0

    dh = h2p - h1p
    dh = torch.where(dh > 180, dh - 360, torch.where(dh < -180, dh + 360, dh))
    dh = torch.where(chroma_zero, torch.zeros_like(dh), dh)
    dL, dC = L2 - L1, c2p - c1p
    dH = 2 * (c1p * c2p).sqrt() * torch.sin(torch.deg2rad(dh) / 2)

    L_bar, c_bar_p = (L1 + L2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_bar = torch.where((h1p - h2p).abs() <= 180, h_sum / 2,
                        torch.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_bar = torch.where(chroma_zero, h_sum, h_bar)

    def cos_deg(x: Tensor) -> Tensor:
        return torch.cos(torch.deg2rad(x))

    T = (1 - 0.17 * cos_deg(h_bar - 30) + 0.24 * cos_deg(2 * h_bar)
         + 0.32 * cos_deg(3 * h_bar + 6) - 0.20 * cos_deg(4 * h_bar - 63))
    d_theta = 30 * torch.exp(-(((h_bar - 275) / 25).square()))
    c_bar_p7 = c_bar_p.pow(7)
    R_C = 2 * (c_bar_p7 / (c_bar_p7 + 25.0**7)).sqrt()
    S_L = 1 + 0.015 * (L_bar - 50).square() / (20 + (L_bar - 50).square()).sqrt()
    S_C = 1 + 0.045 * c_bar_p
    S_H = 1 + 0.015 * c_bar_p * T
    R_T = -torch.sin(torch.deg2rad(2 * d_theta)) * R_C
    tL, tC, tH = dL / S_L, dC / S_C, dH / S_H
    return (tL.square() + tC.square() + tH.square() + R_T * tC * tH).clamp(min=0).sqrt()


def mean_ciede2000(pred: Tensor, truth: Tensor) -> Tensor:
    """Mean CIEDE2000 over the pixels of each RGB image [..., 3, H, W] in [0, 1] -> [...]."""
    return ciede2000(rgb_to_cielab(pred), rgb_to_cielab(truth)).mean(dim=(-2, -1))


# --- whole videos, streamed frame by frame (tricolor-eval) ---------------------------------


class _StreamingCDC:
    """CDC of a video pushed frame by frame: the same definition as `clip_cdc` (dilations
    {1, 2, 4}, those with at least one frame pair), keeping only the last 4 histograms."""

    def __init__(self) -> None:
        self.recent: list[Tensor] = []
        self.sums = {d: torch.zeros(3, dtype=torch.float64) for d in CDC_DILATIONS}
        self.pairs = dict.fromkeys(CDC_DILATIONS, 0)

    def push(self, frame: Tensor) -> None:
        hist = histograms(frame.float()).cpu()  # [3, 256]
        for d in CDC_DILATIONS:
            if len(self.recent) >= d:
                self.sums[d] += js_divergence(self.recent[-d], hist).double()
                self.pairs[d] += 1
        self.recent = [*self.recent, hist][-max(CDC_DILATIONS):]

    def value(self) -> float:
        per_dilation = [self.sums[d] / self.pairs[d] for d in CDC_DILATIONS if self.pairs[d]]
        if not per_dilation:
            return float("nan")  # a one-frame video has no CDC
        return torch.stack(per_dilation).mean(dim=0).mean().item()


class _VideoAccumulator:
    """Running sums of one colorization (or of the ground truth) over a video."""

    def __init__(self) -> None:
        self.sq_err = 0.0  # sum of squared RGB errors, for the PSNR of the whole video
        self.values = 0  # how many values went into sq_err
        self.ssim = 0.0
        self.ciede = 0.0
        self.colourfulness = 0.0
        self.warp = 0.0
        self.cdc = _StreamingCDC()
        self.prev: Tensor | None = None
        self.psnr_by_frame: list[float] = []  # NaN where a frame is not scored (a keyframe)


class VideoScores:
    """Whole-video scores of several colorizations of one video, fed frame by frame.

    `update(truth, grey, preds)`: truth and each of `preds` (a dict: method name -> frame)
    are one RGB frame [3, H, W] in [0, 1]; grey [1, H, W] in [0, 1] is the greyscale input,
    from which the flow is computed (once per frame pair, shared by all methods and the
    ground truth). Only the previous frame and the last CDC histograms are kept, so a video
    of any length is scored in constant memory. `compute()` returns per method:

    - psnr: 10 log10(1 / MSE over every frame, channel and pixel of the video), capped at
      `PSNR_CAP_DB` -- what `clip_psnr` gives for the whole video as one clip;
    - ssim: the mean over frames of torchmetrics' SSIM (`clip_ssim`);
    - cdc, cdc_truth: `clip_cdc` of the whole video (dilations {1, 2, 4});
    - warp, warp_truth, warp_excess: E_warp over the frame pairs whose mask is not empty
      (flows, masks and E_pair as `ColorizationMetrics`); NaN when no pair is valid;
    - colourfulness, colourfulness_truth: the mean over frames of M; colourfulness_diff:
      |M(output) - M(truth)| of these means;
    - ciede2000: the mean over pixels and frames.
`psnr_by_frame()`: per method, each frame's own PSNR in order (the drift curve).

    `update(..., scored=False)` (a keyframe: its colour was given) leaves the frame out of the
    per-frame scores (PSNR, SSIM, CIEDE2000, colourfulness; NaN in psnr_by_frame) but keeps it
    in the temporal ones (CDC, warp error): a jump from a keyframe to the next frame is a flaw
    to see. `frames` counts every frame, `scored` the scored ones.
    """

    def __init__(self, methods: list[str]) -> None:
        self.methods = list(methods)
        self.acc = {name: _VideoAccumulator() for name in [*self.methods, "truth"]}
        self.frames = 0
        self.scored = 0
        self.warp_pairs = 0
        self.prev_grey: Tensor | None = None

    @torch.no_grad()
    def update(self, truth: Tensor, grey: Tensor, preds: dict[str, Tensor],
               scored: bool = True) -> None:
        if truth.ndim != 3 or truth.shape[0] != 3:
            raise ValueError(f"truth must be one RGB frame [3, H, W]; got {tuple(truth.shape)}")
        if grey.shape != (1, *truth.shape[1:]):
            raise ValueError(f"grey must be [1, H, W] matching truth; got {tuple(grey.shape)}")
        if set(preds) != set(self.methods):
            raise ValueError(f"expected predictions for {self.methods}; got {sorted(preds)}")
        with torch.autocast(device_type=truth.device.type, enabled=False):
            frames = {name: p.float() for name, p in preds.items()} | {"truth": truth.float()}
            for name, frame in frames.items():
                if frame.shape != truth.shape:
                    raise ValueError(f"{name}: frame {tuple(frame.shape)} does not match the "
                                     f"truth {tuple(truth.shape)}")
            pair = None
            if self.prev_grey is not None:  # flow between the previous frame and this one
                fwd, bwd = farneback_flows(torch.stack([self.prev_grey, grey.float()])[None])
                pair = fwd, non_occlusion_mask(fwd[0], bwd[0])[None]  # [1,1,2,H,W], [1,1,H,W]
            pair_valid = False
            truth_b = truth.float()[None, None]
            for name, frame in frames.items():
                acc, x = self.acc[name], frame[None, None]  # [1, 1, 3, H, W]
                if name != "truth" and scored:
                    sq_err = (frame - truth.float()).double().square().sum().item()
                    acc.sq_err += sq_err
                    acc.values += frame.numel()
                    acc.psnr_by_frame.append(_psnr(sq_err / frame.numel()))
                    acc.ssim += clip_ssim(x, truth_b).item()
                    acc.ciede += mean_ciede2000(frame, truth.float()).item()
                elif name != "truth":
                    acc.psnr_by_frame.append(float("nan"))
                if scored:
                    acc.colourfulness += colourfulness(frame).item()
                acc.cdc.push(frame)
                if pair is not None:
                    err, valid = clip_warp_error(torch.cat([acc.prev[None, None], x], dim=1),
                                                 *pair)
                    acc.warp += err.item() if valid.item() else 0.0
                    pair_valid = bool(valid.item())
                acc.prev = frame
        self.warp_pairs += int(pair_valid)
        self.prev_grey = grey.float()
        self.frames += 1
        self.scored += int(scored)

    def compute(self) -> dict[str, dict[str, float]]:
        if not self.scored:
            raise ValueError("no frames were scored")
        nan = float("nan")
        truth = self.acc["truth"]
        cdc_truth = truth.cdc.value()
        warp_truth = truth.warp / self.warp_pairs if self.warp_pairs else nan
        m_truth = truth.colourfulness / self.scored
        out = {}
        for name in self.methods:
            acc = self.acc[name]
            warp = acc.warp / self.warp_pairs if self.warp_pairs else nan
            m = acc.colourfulness / self.scored
            out[name] = {
                "psnr": _psnr(acc.sq_err / acc.values),
                "ssim": acc.ssim / self.scored,
                "cdc": acc.cdc.value(),
                "cdc_truth": cdc_truth,
                "warp": warp,
                "warp_truth": warp_truth,
                "warp_excess": warp - warp_truth,
                "colourfulness": m,
                "colourfulness_truth": m_truth,
                "colourfulness_diff": abs(m - m_truth),
                "ciede2000": acc.ciede / self.scored,
            }
        return out

    def psnr_by_frame(self) -> dict[str, list[float]]:
        """Each method's per-frame PSNR, in frame order; NaN at frames not scored."""
        return {name: list(self.acc[name].psnr_by_frame) for name in self.methods}


def _psnr(mse: float) -> float:
    """PSNR of RGB in [0, 1] from its mean squared error, capped at PSNR_CAP_DB."""
    return PSNR_CAP_DB if mse == 0 else float(min(PSNR_CAP_DB, -10 * np.log10(mse)))
