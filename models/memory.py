"""Colour memory: the previous frame's colour, G's second input in both modes.

What G gets for frame t-1 (normalized, [B, C + 2, H, W]): its colour -- a,b in grey mode
(C = 2), Lab in line-art mode (C = 3) --, a `present` channel of ones (the hint-plus-mask
input of user-guided colorization, Zhang et al. 2017: a black or grey memory stays
distinguishable from none, which is all zeros) and frame t-1's condition (L or line art), by
which G finds where each colour moved (models/generator.py, `MemoryGate`).

At inference (and validation) the memory is G's own previous output, a keyframe's colour, or
none at a scene's first frame (models/rollout.py, `rollout`). In training, per sample:
    none                        with probability p_drop (TCVC's scheme, 0.5)
    G's own prediction of t-1   with probability scheduled_sampling (what inference feeds)
    ground truth of t-1         otherwise (what a keyframe gives)
G's prediction of t-1 would need the colour of t-2, which a triplet lacks: it is made from no
memory, as at a shot's first frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.config import Mode, ModelConfig, choice


def memory_of(colour: Tensor, frame: Tensor) -> Tensor:
    """A frame's colour [B, C, H, W] (G's output, the truth or a keyframe's) and its condition
    [B, 1, H, W] (L, or line art) as the next frame's memory [B, C + 2, H, W]."""
    return torch.cat([colour, torch.ones_like(colour[:, :1]), frame.to(colour.dtype)], dim=1)


def no_memory_like(like: Tensor, mode: Mode | str) -> Tensor:
    """"No previous colour" [B, C + 2, H, W] for frames shaped like `like` [B, *, H, W]."""
    c = 2 if choice(Mode, mode, "mode") == Mode.grey else 3
    return like.new_zeros(like.shape[0], c + 2, *like.shape[-2:])


def previous_colour(
    condition: Tensor,
    target: Tensor,
    cfg: ModelConfig,
    generator: torch.Generator | None = None,
    own: Tensor | None = None,
) -> Tensor:
    """The memory G gets for frame t in training [B, C + 2, H, W], per sample none, G's own
    prediction or the truth (module doc).

    condition [B, 3, 1, H, W] (L, or line art) and target [B, 3, C, H, W] (a,b or Lab) of the
    triplet; `own`, G's colour of frame t-1 (models/rollout.py, `first_frame_colour`), is
    needed whenever scheduled_sampling > 0 and is made for the whole batch, never for a
    random subset: with SyncBatchNorm every rank must run the same forwards. (Made by the
    caller, not here, because the rollout builds on this module.)
    """
    truth = memory_of(target[:, 0], condition[:, 0])
    none = torch.zeros_like(truth)
    u = torch.rand(truth.shape[0], 1, 1, 1, generator=generator, device=truth.device)
    memory = torch.where(u < cfg.p_drop, none, truth)
    if cfg.scheduled_sampling > 0 and cfg.temporal:  # the per-frame control ignores it
        if own is None:
            raise ValueError("scheduled_sampling > 0: previous_colour needs G's own colour of "
                             "frame t-1 (models.rollout.first_frame_colour)")
        own = memory_of(own.to(truth.dtype), condition[:, 0])
        pick = (u >= cfg.p_drop) & (u < cfg.p_drop + cfg.scheduled_sampling)
        memory = torch.where(pick, own, memory)
    return memory
