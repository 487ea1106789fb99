"""Line-art mode's training input: which "previous colour frame" G gets for frame t.

At inference G is fed its own previous output, or black at a shot's first frame. Trained only
on ground truth it learns to copy colours from a perfect hint, and drifts once the hint is its
own imperfect output. So, per sample:
    black                       with probability p_drop (the second seed's scheme, 0.5)
    G's own prediction of t-1   with probability scheduled_sampling
    ground truth of t-1         otherwise
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.colour import black_lab_like
from models.config import ModelConfig


def previous_colour(
    G: Callable[[Tensor, Tensor], Tensor],
    condition: Tensor,
    target: Tensor,
    cfg: ModelConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """condition [B, 3, 1, H, W] line art, target [B, 3, 3, H, W] Lab -> Lab of t-1 [B, 3, H, W].

    G's prediction of t-1 would need the colour of t-2, which a triplet lacks: it is made
    from a black hint, as at a shot's first frame, so it is the kind of imperfect frame G
    meets at inference. It is computed for the whole batch whenever scheduled_sampling > 0,
    never for a random subset: with SyncBatchNorm every rank must run the same forwards.
    """
    truth = target[:, 0]
    black = black_lab_like(truth)
    u = torch.rand(truth.shape[0], 1, 1, 1, generator=generator, device=truth.device)
    prev = torch.where(u < cfg.p_drop, black, truth)
    if cfg.scheduled_sampling > 0:
        with torch.no_grad():
            own = G(condition[:, 0], black).to(truth.dtype)
        pick = (u >= cfg.p_drop) & (u < cfg.p_drop + cfg.scheduled_sampling)
        prev = torch.where(pick, own, prev)
    return prev
