"""G over a clip: the one place that says what G is given for each frame of a stream.

    for frame, colour in rollout(G, frames, mode, memory, batch):
        ...  # colour: G's colour of the frame, or the colour given for it

Each frame is a `ClipFrame`: the condition of frame t for B clips side by side ([B, 1, H, W]:
L in grey mode, line art in line-art mode), its scene id and, optionally, a colour given for
it (a keyframe). What G gets for frame t:

- its frame input: grey mode, the L of (t-1, t, t+1) (`window`), a missing neighbour -- at a
  clip's ends and across a scene cut -- replaced by frame t itself, so a frame is never
  coloured from another shot's pixels; line-art mode, the line art of t alone;
- with colour memory (line-art mode; grey mode with `model.memory`; models/memory.py), the
  previous frame's colour: none at a scene's first frame, else G's own previous output, or
  the given colour where one was given (it replaces G's output and the memory goes on from
  it). Such a G is recurrent: one frame per call;
- without memory every frame is independent, so up to `batch` frames go through one call.

Used by validation (trainer/validate.py: all three frames of a triplet), the training step
(trainer/step.py: G's colour of frame t-1, as at a shot's first frame) and inference
(inference/colorizer.py: a video's frames as they are decoded, for tricolor-colorize and
tricolor-eval).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from models.config import Mode, choice
from models.memory import memory_of, no_memory_like


class ClipFrame(NamedTuple):
    """Frame t of B clips side by side: its condition [B, 1, H, W] (L, or line art), its
    scene (a change restarts the temporal context), a colour given for it [B, C, H, W]
    (normalized a,b or Lab, at the condition's size) or None, and the caller's `tag`,
    passed through untouched (which frame of its own this is)."""

    cond: Tensor
    scene: int = 0
    given: Tensor | None = None
    tag: Any = None


def clip_frames(cond: Tensor) -> list[ClipFrame]:
    """The frames of B clips of one scene, condition [B, T, 1, H, W] (a training triplet)."""
    return [ClipFrame(c) for c in cond.unbind(1)]


def window(prev: Tensor | None, cur: Tensor, nxt: Tensor | None) -> Tensor:
    """The grey window of frame t [B, 3, 1, H, W] from the L of t-1, t and t+1 [B, 1, H, W];
    a neighbour that is None (a clip's end, another scene) is frame t itself."""
    return torch.stack([cur if prev is None else prev, cur, cur if nxt is None else nxt], dim=1)


def frame_inputs(frames: Iterable[ClipFrame], mode: Mode | str) -> Iterator[
        tuple[ClipFrame, Tensor]]:
    """Each frame with G's frame input: its grey window (yielded once frame t+1 and its scene
    are known), or its line art."""
    if choice(Mode, mode, "mode") != Mode.grey:
        for frame in frames:
            yield frame, frame.cond
        return

    def around(prev: ClipFrame | None, cur: ClipFrame, nxt: ClipFrame | None) -> Tensor:
        same = [f.cond if f is not None and f.scene == cur.scene else None for f in (prev, nxt)]
        return window(same[0], cur.cond, same[1])

    prev = cur = None
    for nxt in frames:
        if cur is not None:
            yield cur, around(prev, cur, nxt)
        prev, cur = cur, nxt
    if cur is not None:
        yield cur, around(prev, cur, None)


def rollout(G: Callable[..., Tensor], frames: Iterable[ClipFrame], mode: Mode | str,
            memory: bool, batch: int = 1) -> Iterator[tuple[ClipFrame, Tensor]]:
    """(frame, colour) for each frame, in order: G's output [B, C, H, W] as G returns it (its
    dtype, e.g. under autocast), or the frame's given colour. `memory`: whether G takes the
    previous colour (then it runs one frame per call); `batch`: without memory, frames per G
    call. Lazy: G runs only for the frames consumed (plus the ones batched with them), under
    the caller's grad mode."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    inputs = frame_inputs(frames, mode)
    return _recurrent(G, inputs, mode) if memory else _batched(G, inputs, batch)


def _recurrent(G: Callable[..., Tensor], inputs: Iterable[tuple[ClipFrame, Tensor]],
               mode: Mode | str) -> Iterator[tuple[ClipFrame, Tensor]]:
    previous, scene = None, None
    for frame, x in inputs:
        if frame.given is not None:
            colour = frame.given
        else:
            if previous is None or frame.scene != scene:  # a scene's first frame
                previous = no_memory_like(frame.cond, mode)
            colour = G(x, previous)
        yield frame, colour
        # After the yield: a caller that wants only the first frame pays for no memory.
        previous, scene = memory_of(colour.float(), frame.cond), frame.scene


def _batched(G: Callable[..., Tensor], inputs: Iterable[tuple[ClipFrame, Tensor]],
             batch: int) -> Iterator[tuple[ClipFrame, Tensor]]:
    chunk: list[tuple[ClipFrame, Tensor]] = []
    for item in inputs:
        chunk.append(item)
        if len(chunk) == batch:
            yield from _run_chunk(G, chunk)
            chunk = []
    yield from _run_chunk(G, chunk)


def _run_chunk(G: Callable[..., Tensor], chunk: list[tuple[ClipFrame, Tensor]]) -> Iterator[
        tuple[ClipFrame, Tensor]]:
    if not chunk:
        return
    # G runs on a given frame too: the batches stay the same whether or not a colour is given.
    out = G(torch.cat([x for _, x in chunk]))
    for (frame, _), colour in zip(chunk, out.split([x.shape[0] for _, x in chunk])):
        yield frame, colour if frame.given is None else frame.given


def centre_input(condition: Tensor, mode: Mode | str) -> Tensor:
    """G's frame input for the centre frame t of a triplet [B, 3, 1, H, W], whose neighbours
    are all there: the triplet itself (grey mode), or the line art of t."""
    return condition if choice(Mode, mode, "mode") == Mode.grey else condition[:, 1]


@torch.no_grad()
def first_frame_colour(G: Callable[..., Tensor], condition: Tensor, mode: Mode | str,
                       memory: bool) -> Tensor:
    """G's colour of frame t-1 of a triplet [B, 3, 1, H, W], made as at a shot's first frame
    (no memory: a triplet has no t-2; grey window (t-1, t-1, t)), without gradient.
    `memory`: whether G takes a memory input."""
    return next(rollout(G, clip_frames(condition), mode, memory))[1]
