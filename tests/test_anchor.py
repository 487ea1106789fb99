"""The anchor track follows motion, stays the identity on a still shot, and samples once."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.anchor import AnchorTrack, flow_input
from tests.videos import textured_frames

H, W = 64, 96


def panning(n: int, px_per_frame: float) -> list[np.ndarray]:
    """`n` grey frames of a smooth texture moving right by `px_per_frame` (sub-pixel too)."""
    big = cv2.cvtColor(textured_frames(1, W + 200, H, seed=3)[0], cv2.COLOR_RGB2GRAY)
    big = cv2.GaussianBlur(big, (0, 0), 2)
    return [cv2.warpAffine(big, np.float32([[1, 0, -100 + px_per_frame * k], [0, 1, 0]]),
                           (W, H)) for k in range(n)]


def test_a_still_shot_keeps_the_identity_map_exactly_so_the_keyframe_never_fades():
    frame = panning(1, 0)[0]
    track = AnchorTrack()
    track.start(frame)
    for _ in range(60):
        track.step(frame)
    ys, xs = np.mgrid[0:H, 0:W]
    assert np.array_equal(track.coords[..., 0], xs) and np.array_equal(track.coords[..., 1], ys)
    key = np.random.default_rng(0).random((2 * H, 2 * W, 2), dtype=np.float32)
    colour, _ = track.sample(key, 2 * H, 2 * W)
    assert np.array_equal(colour, key)  # at twice the working size too


@pytest.mark.parametrize("speed", [2.0, 0.5])
def test_the_chain_follows_a_pan_and_marks_what_entered_the_frame_invalid(speed):
    frames = panning(16, speed)
    track = AnchorTrack()
    track.start(frames[0])
    for frame in frames[1:]:
        track.step(frame)
    moved = 15 * speed
    xs = np.mgrid[0:H, 0:W][1]
    # x in the last frame was at x - moved in the keyframe; columns x < moved entered later
    entered = xs < moved - 1  # a pixel of slack: DIS is smooth across the edge
    assert not track.valid[entered].any()
    inner = track.valid & (xs > moved + 2)
    assert inner.mean() > 0.6 * (1 - moved / W)
    error = np.abs(track.coords[..., 0] - (xs - moved))[inner]
    assert error.mean() < 0.25 + 0.05 * 15  # DIS: a fraction of a pixel per step at worst


def test_sampling_takes_the_keyframe_colour_from_where_the_pixel_came_from():
    frames = panning(6, 2.0)
    track = AnchorTrack()
    track.start(frames[0])
    for frame in frames[1:]:
        track.step(frame)
    key = np.dstack([np.tile(np.arange(W, dtype=np.float32), (H, 1))] * 2)  # colour = x
    colour, valid = track.sample(key, H, W)
    xs = np.mgrid[0:H, 0:W][1]
    assert np.abs(colour[..., 0] - (xs - 10))[valid].mean() < 0.5
    assert np.array_equal(colour[~valid], key[~valid])  # invalid: the keyframe pasted


def test_line_art_is_blurred_before_tracking_and_grey_is_not():
    cond = np.full((H, W), 1.0, np.float32)
    cond[:, W // 2] = -1.0  # one black line on white
    grey = flow_input(cond, "grey")
    lines = flow_input(cond, "lineart")
    assert set(np.unique(grey)) == {0, 255}
    assert 0 < lines[0, W // 2 + 2] < 255  # a ramp beside the line, for DIS to lock on
