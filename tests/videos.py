"""Small synthetic videos for the tests, encoded with PyAV (nothing is downloaded). PyAV is
imported by the functions that encode or decode: the frames alone need only numpy (the GPU
host's stages use them without PyAV: gpu/)."""

from __future__ import annotations

from pathlib import Path

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
    import av

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
    import av

    with av.open(str(path)) as container:
        return np.stack(
            [
                f.reformat(width, height, format="rgb24").to_ndarray().astype(np.float32)
                for f in container.decode(video=0)
            ]
        )


def rotated_video(path: Path, upright: list[np.ndarray], degrees: int, fps: int = 25) -> Path:
    """A video as a phone records it: the frames stored turned (clockwise by `degrees`) and a
    display matrix that tells players to turn them back (`degrees` counter-clockwise), so
    what a player shows is `upright`."""
    import av

    stored = [np.ascontiguousarray(np.rot90(f, -(degrees // 90))) for f in upright]
    height, width = stored[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        stream.set_display_rotation(degrees)  # before the first frame is encoded
        for rgb in stored:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def size_change_video(path: Path, segments: list[tuple[int, int, int]]) -> Path:
    """One MPEG-TS video whose frame size changes mid-stream: H.264 segments of
    (frames, width, height), each encoded on its own and concatenated byte for byte (as
    FFmpeg's concat protocol joins transport streams); the decoder meets a new SPS with
    the new size at each join."""
    import av

    data = b""
    for i, (n, width, height) in enumerate(segments):
        part = path.with_name(f"{path.stem}.part{i}.ts")
        with av.open(str(part), "w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "12", "preset": "ultrafast"}
            for rgb in textured_frames(n, width, height, seed=10 + i):
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        data += part.read_bytes()
        part.unlink()
    path.write_bytes(data)
    return path
