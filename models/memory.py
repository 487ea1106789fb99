"""Colour memory: the previous frame's colour, G's second input in both modes.

What G gets for frame t-1 (normalized, [B, 3, H, W]):
    line-art mode  its Lab; "none" is a black frame (L = -1, a = b = 0), as in the second seed
    grey mode      (a, b, present): its a,b and a channel of ones; "none" is all zeros (the
                   hint-plus-mask input of user-guided colorization, Zhang et al. 2017: a
                   grey memory, a = b = 0, stays distinguishable from no memory)

At inference the memory is G's own previous output, a keyframe's colour, or none at a scene's
first frame. Trained only on the truth, G learns to copy colours from a perfect hint and
drifts once the hint is its own imperfect output. So in training, per sample:
    none                        with probability p_drop (the second seed's scheme, 0.5)
    G's own prediction of t-1   with probability scheduled_sampling
    ground truth of t-1         otherwise (what a keyframe gives)
G's prediction of t-1 needs the colour of t-2, which a triplet lacks: it is made from no
memory, as at a shot's first frame, and then, `memory_unroll` - 1 more times, from its own
previous prediction of the same frame -- a static shot's recurrence, where errors would
compound -- so G meets the kind of memory it makes itself at inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.colour import black_lab_like
from models.config import Mode, ModelConfig, choice


def grey_memory(ab: Tensor) -> Tensor:
    """Grey mode's memory of a frame whose a,b [B, 2, H, W] are known: (a, b, 1)."""
    return torch.cat([ab, torch.ones_like(ab[:, :1])], dim=1)


def no_memory_like(like: Tensor, mode: Mode | str) -> Tensor:
    """"No previous colour" [B, 3, H, W] for frames shaped like `like` [B, C, H, W]."""
    empty = like.new_zeros(like.shape[0], 3, *like.shape[-2:])
    return black_lab_like(empty) if choice(Mode, mode, "mode") == Mode.lineart else empty


def memory_of(colour: Tensor, mode: Mode | str) -> Tensor:
    """G's output for a frame (a,b in grey mode, Lab in line-art mode) as the next frame's
    memory."""
    return grey_memory(colour) if choice(Mode, mode, "mode") == Mode.grey else colour


def first_frame_input(condition: Tensor, mode: Mode | str) -> Tensor:
    """G's frame input for frame t-1 of a triplet [B, 3, 1, H, W], as at a shot's first
    frame: the grey window (t-1, t-1, t), or the line art of t-1."""
    return condition[:, [0, 0, 1]] if choice(Mode, mode, "mode") == Mode.grey else condition[:, 0]


def previous_colour(
    G: Callable[[Tensor, Tensor], Tensor],
    condition: Tensor,
    target: Tensor,
    cfg: ModelConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The memory G gets for frame t in training [B, 3, H, W], per sample none, G's own
    prediction or the truth (module doc).

    condition [B, 3, 1, H, W] (L, or line art) and target [B, 3, C, H, W] (a,b or Lab) of the
    triplet. The own prediction is computed for the whole batch whenever scheduled_sampling >
    0, never for a random subset: with SyncBatchNorm every rank must run the same forwards.
    """
    mode = choice(Mode, cfg.mode, "mode")
    truth = memory_of(target[:, 0], mode)
    none = no_memory_like(truth, mode)
    u = torch.rand(truth.shape[0], 1, 1, 1, generator=generator, device=truth.device)
    memory = torch.where(u < cfg.p_drop, none, truth)
    if cfg.scheduled_sampling > 0:
        frame = first_frame_input(condition, mode)
        own = none
        with torch.no_grad():
            for _ in range(cfg.memory_unroll):
                own = memory_of(G(frame, own).to(truth.dtype), mode)
        pick = (u >= cfg.p_drop) & (u < cfg.p_drop + cfg.scheduled_sampling)
        memory = torch.where(pick, own, memory)
    return memory
