"""Frames in, frames out: decoded frames prepared as in training, then coloured by G.

    items = prepare(source.read(), (w, h), model, device, fps)  # Items: condition, scene
    items = keyframes(items)                                     # optional: Item.keyframe
    for item in Colorizer(model, batch_size)(items, "out"):      # item.outputs["out"]: RGB
        ...

A stream of generators: a frame leaves as soon as G has coloured it, while later ones are
still decoding. What G is given for each frame (windows, colour memory, scene restarts,
keyframes) is models/rollout.py's `rollout`; how the output frame is made of G's colour at
full resolution is documented with `tricolor-colorize` (inference/colorize.py). Shared with
`tricolor-eval` (inference/evaluate.py), which scores exactly what the tool writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from inference.keyframes import is_greyscale
from inference.model import Model
from models.colour import (
    compose_grey,
    lab_to_uint8,
    line_art,
    resize,
    rgb_to_lab_triplets,
    to_uint8,
)
from models.rollout import ClipFrame, rollout
from shards.scenes import SceneCuts

SCENE_THRESHOLD = 27.0  # `tricolor-shards build --scene-threshold` default


@dataclass
class Item:
    """One frame on its way through: the full-resolution input, its scene and G's condition
    at the working resolution ([1, h, w] in [-1, 1]: L, or line art), what the colorizers
    made of it (name -> RGB uint8 [H, W, 3]) and, if one is given, its colour keyframe (RGB
    uint8 at the input's size)."""

    index: int
    rgb: np.ndarray
    pts: int | None
    scene: int
    cond: Tensor
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    keyframe: np.ndarray | None = None  # its colour is given (inference/keyframes.py)


@torch.inference_mode()
def prepare(frames: Iterable, size: tuple[int, int], model: Model, device: torch.device,
            fps: float, threshold: float = SCENE_THRESHOLD,
            lineart_input: bool = False) -> Iterator[Item]:
    """Decoded frames (`video_in.Frame`) -> Items: resized to `size` (w, h), scene ids,
    and the condition computed exactly as in training (`rgb_to_lab_triplets`, `line_art`)."""
    cuts = None
    for index, frame in enumerate(frames):
        small = cv2.resize(frame.rgb, size, interpolation=cv2.INTER_AREA)
        if cuts is None:
            # A greyscale input has no hue or saturation change at a cut, only luma, a third
            # of the detector's score.
            cuts = SceneCuts(fps, threshold / 3 if is_greyscale(small) else threshold)
        scene = cuts.push(small)
        lab = rgb_to_lab_triplets(torch.from_numpy(small).to(device)[None, None])[0, 0]
        if model.mode == "grey" or lineart_input:
            cond = lab[:1]
        else:
            cond = line_art(lab[None], *model.canny)[0]
        yield Item(index, frame.rgb, frame.pts, scene, cond)


def condition_image(item: Item, mode: str) -> np.ndarray:
    """What G was given, at full resolution, for --side-by-side: the greyscale frame, or the
    line art (upsampled)."""
    if mode == "grey":
        return compose_grey(item.rgb, torch.zeros(2, 1, 1, device=item.cond.device))
    H, W = item.rgb.shape[:2]
    return to_uint8(((resize(item.cond, H, W) + 1) / 2).expand(3, -1, -1))


def keyframe_colour(item: Item, mode: str) -> Tensor | None:
    """The item's keyframe as G's colour at the input's size: normalized a,b [2, H, W]
    (grey mode) or Lab [3, H, W], on the item's device; None without a keyframe."""
    if item.keyframe is None:
        return None
    rgb = torch.from_numpy(item.keyframe).to(item.cond.device)[None, None]
    lab = rgb_to_lab_triplets(rgb)[0, 0]
    return lab[1:] if mode == "grey" else lab


class Colorizer:
    """Colours a stream of Items with G, as the model was trained (models/rollout.py).

    `colorizer(items, key)` yields the same Items in order, each with `outputs[key]` set;
    a generator, so the next stage can consume frames while later ones are still decoding.
    A G with colour memory runs recurrently, one frame at a time: its memory is its own
    previous output, a keyframe's colour, or none at a scene's first frame. At a keyframe the
    output is the keyframe's colour on the input's luminance (grey mode) or the keyframe
    itself (line-art mode).
    """

    def __init__(self, model: Model, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size

    def __call__(self, items: Iterable[Item], key: str) -> Iterator[Item]:
        return self._colour((self._frame(item) for item in items), key)

    def _frame(self, item: Item) -> ClipFrame:
        """The item as a frame of the rollout; a keyframe's colour is given at the working
        resolution (the memory goes on from it there) and kept at full resolution (the
        output is made of it), in the tag."""
        full = keyframe_colour(item, self.model.mode)
        given = None if full is None else F.interpolate(full[None], item.cond.shape[-2:],
                                                        mode="area")
        return ClipFrame(item.cond[None], item.scene, given, (item, full))

    @torch.inference_mode()
    def _colour(self, frames: Iterable[ClipFrame], key: str) -> Iterator[Item]:
        model = self.model
        for frame, colour in rollout(model.G, frames, model.mode, model.memory, self.batch_size):
            item, given = frame.tag
            if model.mode == "grey":
                item.outputs[key] = compose_grey(item.rgb,
                                                 colour[0].float() if given is None else given)
            elif item.keyframe is not None:
                item.outputs[key] = item.keyframe
            else:
                item.outputs[key] = lab_to_uint8(colour[0].float(), *item.rgb.shape[:2])
            yield item
