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
  and channel. CDC's definition averages the dilations {1, 2, 4}; a dilation d >= T has no
  frame pair in a T-frame clip, so the average runs over the dilations d < T ({1, 2} for
  T = 3). Values from 3-frame clips are therefore not comparable with published whole-video CDC.
- Warp error: flow between consecutive grey frames (uint8 = round(255 grey)) with Farnebäck,
  both directions; the non-occlusion mask exactly as Lai et al. write it, with forward
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

from metrics.clip import (
    CDC_DILATIONS,
    PSNR_CAP_DB,
    ciede2000,
    clip_cdc,
    clip_psnr,
    clip_ssim,
    colourfulness,
    histograms,
    js_divergence,
    mean_ciede2000,
    to_uint8,
)
from metrics.flow import (
    FARNEBACK,
    clip_warp_error,
    farneback_flows,
    non_occlusion_mask,
    stored_warp_error,
)
from metrics.validation import FLOW_CACHE_BYTES, ColorizationMetrics
from metrics.video import VideoScores

__all__ = [
    "CDC_DILATIONS", "FARNEBACK", "FLOW_CACHE_BYTES", "PSNR_CAP_DB", "ColorizationMetrics",
    "VideoScores", "ciede2000", "clip_cdc", "clip_psnr", "clip_ssim", "clip_warp_error",
    "colourfulness", "farneback_flows", "histograms", "js_divergence", "mean_ciede2000",
    "non_occlusion_mask", "stored_warp_error", "to_uint8",
]
