"""The anchor track: where each pixel of the current frame lies in the scene's keyframe.

A keyframe's colour is carried to later frames by sampling the keyframe once, through a
coordinate map chained frame to frame with optical flow. Coordinates are composed, never
colours: colours sampled again every frame are low-passed again every frame, and a still
shot fades. With no motion the map stays the identity, so the anchor is the keyframe itself.

The flow is OpenCV's DIS on the model's input (grey L, or blurred line art), as the shards
store it (shards/flow.py), between consecutive frames. A pixel stays valid while every step
of its chain stayed inside the frame and passed the forward-backward check; where it is not
valid the caller decides (the keyframe pasted in place, or G's own colour).
"""

from __future__ import annotations

import cv2
import numpy as np

from shards.flow import dis_flow, visible

# Line art is mostly flat white: DIS needs gradients to lock on, so the lines are blurred
# into ramps first (sigma in pixels at the working resolution).
LINE_ART_BLUR = 2.0


def flow_input(cond: np.ndarray, mode: str) -> np.ndarray:
    """G's condition [h, w] in [-1, 1] (L, or line art) -> the uint8 image DIS tracks."""
    grey = np.clip((cond + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if mode == "lineart":
        grey = cv2.GaussianBlur(grey, (0, 0), LINE_ART_BLUR)
    return grey


class AnchorTrack:
    """One scene's chain from its keyframe. `start(grey)` at the keyframe, `step(grey)` at
    each later frame; `coords` [h, w, 2] (x, y in keyframe pixels) and `valid` [h, w]."""

    def __init__(self):
        self.coords: np.ndarray | None = None
        self.valid: np.ndarray | None = None
        self._previous: np.ndarray | None = None

    def start(self, grey: np.ndarray) -> None:
        h, w = grey.shape
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        self._grid = np.dstack([xs, ys])
        self.coords, self.valid, self._previous = self._grid.copy(), np.ones((h, w), bool), grey

    @property
    def started(self) -> bool:
        return self.coords is not None

    def step(self, grey: np.ndarray) -> None:
        """Extend the chain to the next frame: x in this frame lies at x + f(x) in the
        previous one, so its keyframe position is the previous map sampled there."""
        back = dis_flow(grey, self._previous)  # this frame -> the previous one
        fore = dis_flow(self._previous, grey)
        at = self._grid + back
        h, w = grey.shape
        inside = ((at[..., 0] >= 0) & (at[..., 0] <= w - 1) &
                  (at[..., 1] >= 0) & (at[..., 1] <= h - 1))
        self.coords = cv2.remap(self.coords, at[..., 0], at[..., 1], cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
        carried = cv2.remap(self.valid.astype(np.float32), at[..., 0], at[..., 1],
                            cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        self.valid = (carried > 0.5) & inside & visible(back, fore)
        self._previous = grey

    def sample(self, keyframe: np.ndarray, height: int, width: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
        """`keyframe` [H, W, C] float32 (any channels, at the output's size) sampled once
        through the chain: (colour [H, W, C], valid [H, W] bool). Where the chain is not
        valid the keyframe's own pixel is taken (the copy baseline's choice)."""
        h, w = self.valid.shape
        # the displacement is resized, not the map: zero motion stays exactly zero
        scale = np.array([width / w, height / h], np.float32)
        moved = cv2.resize(self.coords - self._grid, (width, height),
                           interpolation=cv2.INTER_LINEAR) * scale
        valid = cv2.resize(self.valid.astype(np.float32), (width, height),
                           interpolation=cv2.INTER_LINEAR) > 0.5
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        mx = xs + np.where(valid, moved[..., 0], 0)
        my = ys + np.where(valid, moved[..., 1], 0)
        colour = cv2.remap(keyframe, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return colour.reshape(height, width, -1), valid
