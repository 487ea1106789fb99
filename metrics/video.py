"""Whole videos scored frame by frame in constant memory (tricolor-eval)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from metrics.clip import (
    CDC_DILATIONS,
    PSNR_CAP_DB,
    clip_ssim,
    colourfulness,
    histograms,
    js_divergence,
    mean_ciede2000,
)
from metrics.flow import clip_warp_error, farneback_flows, non_occlusion_mask


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
