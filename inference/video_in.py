"""Input for `tricolor-colorize` and `tricolor-eval` (PyAV), read one frame at a time.

A video file is decoded one frame at a time and turned upright (its display rotation
applied); a folder of images is read sorted by name (numbers compared as numbers), each image
as an image viewer shows it (its EXIF orientation applied; only regular files are opened, so
a FIFO named like an image cannot block). What cannot be read raises VideoError naming the
file. The output side is `inference.video_out`.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from shards.video import VideoError, decode_checked, open_video, quarter_turns

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}

EXIF_ORIENTATION = 0x0112  # the tag a phone sets instead of turning the pixels
# What an image viewer does to the stored pixels for each valid orientation (1: nothing).
ORIENTATIONS = {1: "shown as stored", 2: "mirrored left-right", 3: "turned 180°",
                4: "mirrored top-bottom",
                5: "mirrored left-right and turned 90° counter-clockwise",
                6: "turned 90° clockwise",
                7: "mirrored left-right and turned 90° clockwise",
                8: "turned 90° counter-clockwise"}


@dataclass
class Frame:
    """One decoded frame: RGB uint8 [H, W, 3] and its timestamp in the source's time base
    (None for image folders)."""

    rgb: np.ndarray
    pts: int | None


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


class Source:
    """A video file or a folder of frames, read one frame at a time.

    fps: frames per second (for a folder: the `fps` given); time_base: of the timestamps
    (None for a folder); frames: the count the container declares (0: unknown); audio:
    whether a video file has an audio stream (it is copied into a video output).
    """

    def __init__(self, path: Path, fps: float = 25.0):
        self.path = Path(path)
        if not self.path.exists():
            raise VideoError(f"{self.path}: no such file or folder")
        self.audio = False
        self.time_base: Fraction | None = None
        self.pix_fmt: str | None = None  # the video's pixel format, e.g. yuv420p
        self.said_orientation = False
        if self.path.is_dir():
            self.images = sorted((p for p in self.path.iterdir()
                                  if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
            if not self.images:
                raise VideoError(f"{self.path}: a folder without image frames "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            self.width, self.height = self._read_image(self.images[0]).shape[1::-1]
            self.fps, self.frames = Fraction(fps).limit_denominator(1001), len(self.images)
            return
        self.images = []
        container, stream = open_video(self.path)  # VideoError naming the file
        try:
            ctx = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate
            self.fps = Fraction(rate) if rate else Fraction(fps).limit_denominator(1001)
            self.time_base = Fraction(stream.time_base) if stream.time_base else None
            self.frames = stream.frames or 0
            self.audio = bool(container.streams.audio)
            self.pix_fmt = ctx.format.name if ctx.format else None
            # The first frame gives the size and the display rotation (phones record
            # sideways and set it): width and height are the upright frame's.
            first = next(decode_checked(container, stream, self.path, 0))
            turns = quarter_turns(first, self.path)
        finally:
            container.close()
        self.width, self.height = first.width, first.height
        if turns % 2:
            self.width, self.height = self.height, self.width

    def _read_image(self, path: Path) -> np.ndarray:
        im, orientation = open_image(path)
        if orientation != 1 and not self.said_orientation:
            print(f"input: {path}: {describe_orientation(orientation)} applied, as image "
                  "viewers show it (said for the first such frame only)", file=sys.stderr)
            self.said_orientation = True
        return np.array(im.convert("RGB"))  # a writable copy, for torch

    def read(self) -> Iterator[Frame]:
        """The frames in order, upright; a decoding error, a frame of another size or a container
        that declares more frames than it holds raise VideoError naming the file."""
        if self.images:
            for path in self.images:
                rgb = self._read_image(path)
                if rgb.shape[:2] != (self.height, self.width):
                    raise VideoError(f"{path}: frame size {rgb.shape[1]}x{rgb.shape[0]} differs "
                                     f"from the first frame's {self.width}x{self.height}")
                yield Frame(rgb, None)
            return
        container, stream = open_video(self.path)
        stream.thread_type = "AUTO"
        for i, frame in enumerate(decode_checked(container, stream, self.path, self.frames)):
            rgb = frame.to_ndarray(format="rgb24")
            turns = quarter_turns(frame, self.path)
            if turns:  # upright, as players show it; the output carries no rotation
                rgb = np.ascontiguousarray(np.rot90(rgb, turns))
            if rgb.shape[:2] != (self.height, self.width):
                raise VideoError(f"{self.path}: frame {i} is {rgb.shape[1]}x{rgb.shape[0]} "
                                 f"upright, not {self.width}x{self.height}")
            yield Frame(rgb, frame.pts)


def describe_orientation(orientation: int) -> str:
    return f"EXIF orientation {orientation} ({ORIENTATIONS[orientation]})"


def open_image(path: Path) -> tuple[Image.Image, int]:
    """The image at `path`, loaded and turned as an image viewer shows it, and the EXIF
    orientation that was applied (1: none). VideoError naming the file for anything but a
    regular file (a FIFO would block the open), an unreadable image, or an orientation tag
    outside 1..8 (no viewer agrees on what it means)."""
    try:
        # Non-blocking: a FIFO opens at once instead of waiting for a writer, to be refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise VideoError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise VideoError(f"{path}: is {file_kind(mode)}, not a regular file; expected an "
                             "image file (move it away or rename it)")
        try:
            with Image.open(f) as im:
                im.load()
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
                if orientation not in ORIENTATIONS:
                    raise VideoError(
                        f"{path}: its EXIF orientation tag (0x0112) is {orientation!r}, not one "
                        "of 1..8, so how it is meant to be shown is unknown; expected a valid "
                        "tag (re-save the image upright without it)")
                return ImageOps.exif_transpose(im), orientation
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise VideoError(f"{path}: not a readable image ({e})") from None


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, for an error message."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
