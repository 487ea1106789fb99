"""Small synthetic videos for the tests, encoded with PyAV (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def textured_frames(n: int, width: int, height: int, seed: int, tint=(1.0, 1.0, 1.0)):
    """`n` frames of a smooth random texture drifting to the right by 2 px per frame: every
    frame differs from its neighbours (so they can be told apart) but no frame is a cut."""
    rng = np.random.default_rng(seed)
    base = rng.random((height // 8 + 1, (width + 2 * n) // 8 + 2, 3))
    big = np.kron(base, np.ones((8, 8, 1)))  # blocky texture, survives JPEG and H.264
    frames = []
    for t in range(n):
        crop = big[:height, 2 * t : 2 * t + width] * np.array(tint)
        frames.append((np.clip(crop, 0, 1) * 255).astype(np.uint8))
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25, faststart=False) -> Path:
    """Encode RGB frames as H.264 in MP4 (moov atom at the end unless `faststart`)."""
    height, width = frames[0].shape[:2]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def scene_video(path: Path, scene_lengths: list[int], width=96, height=64, **kw) -> Path:
    """A video whose scenes (of the given lengths) have unrelated textures and tints, so that
    every scene boundary is a hard cut."""
    tints = [(1, 0.2, 0.2), (0.2, 1, 0.3), (0.3, 0.3, 1), (1, 1, 0.2), (0.2, 1, 1), (1, 0.3, 1)]
    frames = []
    for i, n in enumerate(scene_lengths):
        frames += textured_frames(n, width, height, seed=100 + i, tint=tints[i % len(tints)])
    return write_video(path, frames, **kw)


def decode_all(path: Path, width: int, height: int) -> np.ndarray:
    """Every frame of `path` as RGB, resized to (width, height): an independent reference
    decode for the tests (plain PyAV, default scaler)."""
    with av.open(str(path)) as container:
        return np.stack(
            [
                f.reformat(width, height, format="rgb24").to_ndarray().astype(np.float32)
                for f in container.decode(video=0)
            ]
        )
