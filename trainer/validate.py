"""Validation: the EMA generator colorizes the val split, every rank a slice, metrics reduced.

G predicts the centre frame of a window; to score temporal consistency we need all three
frames of a triplet colorized, so the triplet is run as a clip of its own, the way inference
runs a video (models/rollout.py): grey mode from the windows (t-1, t-1, t), (t-1, t, t+1),
(t, t+1, t+1), padded at the clip's ends; a G with colour memory (line-art mode; grey mode
with `model.memory`) recurrently, from no memory at frame t-1, then from its own previous
output.

The pixels are the same at every validation: the val loader reads its split in order, each
rank its own slice, and takes the centre crop of `data.crop_size` with no flip or jitter
(`TripletLoader(augment=False)`). So the warp error's Farnebäck flows, when the shards store no
flow, are computed once per sample and cached by its key, up to a memory budget per process
(`ColorizationMetrics`, `metrics.FLOW_CACHE_BYTES`).

Beside the model, the same clips are scored for zero chroma (`zero_chroma`: the truth's L with
a = b = 0, i.e. the grey frame itself), giving `psnr_grey`, `ssim_grey` and
`psnr_gain = psnr - psnr_grey`: a model that has learnt nothing about colour scores a gain
near 0 (exactly 0 if it outputs a = b = 0), one that paints wrong colours a negative gain.
In line-art mode the same zero-chroma reference is used, although it is not a baseline the
model could reach: it holds the true L, which the model only sees as edges. It is what doing
nothing would score if the luminance were known, so there a negative gain is expected and says
how far the model is from that; the mean colour of the train split would be a fairer
baseline, but needs a pass over the train split before the first validation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.colour import lab_to_rgb
from models.rollout import clip_frames, rollout
from trainer.data import Batch


@torch.no_grad()
def colorize_triplet(G: nn.Module, cond: Tensor, mode: str) -> Tensor:
    """Normalized Lab of all three frames [B, 3, 3, H, W] from the condition [B, 3, 1, H, W],
    each frame as inference colours it (models/rollout.py): one clip of one scene."""
    memory = mode != "grey" or getattr(G, "memory", False)
    out = torch.stack([colour.float() for _, colour in rollout(G, clip_frames(cond), mode,
                                                               memory)], dim=1)
    return torch.cat([cond.float(), out], dim=2) if mode == "grey" else out


def truth_lab(batch: Batch, mode: str) -> Tensor:
    return torch.cat([batch.cond, batch.target], dim=2) if mode == "grey" else batch.target


def zero_chroma(truth: Tensor) -> Tensor:
    """The grey baseline: normalized Lab [..., 3, H, W] with its L and a = b = 0."""
    return torch.cat([truth[..., :1, :, :], torch.zeros_like(truth[..., 1:, :, :])], dim=-3)


def image_grid(batch: Batch, pred_lab: Tensor, mode: str, rows: int = 4) -> Tensor:
    """RGB [3, H', W']: per sample a row of condition | prediction | truth, frames t-1, t, t+1."""
    n = min(rows, pred_lab.shape[0])
    cond = ((batch.cond[:n].float() + 1) / 2).expand(-1, -1, 3, -1, -1)  # grey as RGB
    parts = [cond, lab_to_rgb(pred_lab[:n]), lab_to_rgb(truth_lab(batch, mode)[:n])]
    row = torch.cat([f for part in parts for f in part.unbind(1)], dim=-1)  # [n, 3, H, 9W]
    return torch.cat(list(row), dim=-2)  # [3, nH, 9W]


@torch.no_grad()
def validate(G: nn.Module, loader, metrics, mode: str):
    """Run `metrics` (`ColorizationMetrics`; synced across ranks by `compute`) over the val
    loader, with the zero-chroma baseline beside the model; returns (metric dict, first batch,
    its prediction) for the image grid."""
    metrics.reset()
    first = None
    for batch in loader:  # always the whole split: a loader epoch is never cut short
        pred = colorize_triplet(G, batch.cond, mode)
        truth = truth_lab(batch, mode)
        grey = (truth[:, :, :1].float() + 1) / 2  # the frames' luminance, for the flow
        flow = None if batch.flow is None else (batch.flow, batch.flow_mask)  # stored: no
        metrics.update(lab_to_rgb(pred), lab_to_rgb(truth), grey,  # Farnebäck on the CPU
                       lab_to_rgb(zero_chroma(truth)), flow,
                       keys=batch.keys)  # else its flows, once per sample (the same crops)
        if first is None:
            first = (batch, pred)
    return {k: float(v) for k, v in metrics.compute().items()}, first
