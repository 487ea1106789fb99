"""Colour keyframes: frames whose colour is given, and from which the model's memory goes on.

Three sources, each a stage that sets `Item.keyframe` (RGB uint8 at the input's size) on the
frames that have one, before the colorizers see them:

    KeyframeFolder(PATH, ...)          PATH/000120.png ...: colour images named by frame index
    KeyframeVideo(PATH, frames|cuts)   a colour video as long as the input: its frame at the
                                       listed indices, or at every scene start of the input
                                       (one without colour, e.g. a fade from black, skipped)
    TruthKeyframes("first"|"every:N")  tricolor-eval: the ground truth's own frame at every
                                       scene start (the exemplar protocol of DeepExemplar and
                                       ColorMNet), or at every N-th frame

Keyframe images are read as an image viewer shows them, as input frames are: an EXIF
orientation tag (a phone's photo stored sideways or upside down) is applied, and the tool says
so; a tag outside 1..8 is refused, naming it. A keyframe of the input's aspect but another
size is resized (area averaging) to the input's size, and the tool says so; one of another
aspect, a grey one, one with transparent pixels (their colour is hidden in a viewer, but
would be used), anything but a regular file (a FIFO would block), an unreadable one or an
index past the input's end is a KeyframeError naming the file. Frame indices, in file names
and in --keyframe-frames, are plain decimal digits (not `0_1`, `+1` or other scripts'
digits, which Python's int() would take). Folder keyframes are all read and
checked before any output is written; a video's are checked as they stream, and an error
there aborts the output like any decoding error.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from inference.video_in import (
    IMAGE_SUFFIXES,
    Source,
    describe_orientation,
    file_kind,
    open_image,
)
from shards.spool import is_grey
from shards.video import VideoError

GREY_LEVELS = 3  # a frame whose channels differ by at most this many levels is greyscale
ASPECT_TOLERANCE = 0.01  # relative: 1920x1080 and 1280x720 match, 1440x1080 does not
INDEX = re.compile(r"[0-9]+")  # ASCII digits only: int() also takes "0_1", "+1", "١"


class KeyframeError(Exception):
    """A keyframe that cannot be used; the message names the file and what was expected."""


def is_greyscale(rgb: np.ndarray) -> bool:
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    return int(spread.max(initial=0)) <= GREY_LEVELS


def fit_keyframe(rgb: np.ndarray, width: int, height: int, where: str,
                 orientation: int = 1) -> np.ndarray:
    """`rgb` checked (colour, the input's aspect) and resized to width x height if needed;
    `orientation`: the EXIF orientation that turned it upright, named if its aspect is off."""
    if is_grey(rgb):  # as the shards judge frames: a few levels of codec noise are grey
        raise KeyframeError(f"{where}: a greyscale keyframe gives no colour; expected a colour "
                            "image")
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    if abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        shown = (f" as shown, after its {describe_orientation(orientation)}"
                 if orientation != 1 else "")
        raise KeyframeError(f"{where}: keyframe is {w}x{h}{shown}, the input {width}x{height}: "
                            "another aspect ratio; expected the input's (crop or pad it first)")
    print(f"keyframes: {where}: {w}x{h} resized to the input's {width}x{height}",
          file=sys.stderr)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def read_image(path: Path) -> tuple[np.ndarray, int]:
    """RGB uint8 as an image viewer shows it, as input frames are read (so a copy of an input
    frame lines up with it), and the EXIF orientation applied (1: none); the tool says so
    when one is. Transparent pixels are refused: a viewer hides their colour."""
    try:
        im, orientation = open_image(path)
    except VideoError as e:
        raise KeyframeError(str(e)) from None
    if im.has_transparency_data:
        im = im.convert("RGBA")
        alpha = np.asarray(im)[..., 3]
        hidden = int((alpha < 255).sum())
        if hidden:
            raise KeyframeError(f"{path}: {hidden} of {alpha.size} pixels are not opaque: their "
                                "colour, hidden in a viewer, would be used; expected an opaque "
                                "image (flatten it onto a background first)")
    if orientation != 1:
        print(f"keyframes: {path}: {describe_orientation(orientation)} applied, as image "
              "viewers show it", file=sys.stderr)
    return np.array(im.convert("RGB")), orientation


def parse_frame_list(text: str) -> list[int]:
    """'0,120,240' -> [0, 120, 240] (sorted, unique); KeyframeError for anything else."""
    items = [x.strip() for x in text.split(",")]
    for x in items:
        if not INDEX.fullmatch(x):
            raise KeyframeError(f"--keyframe-frames {text!r}: {x!r} is not a frame index; "
                                "expected plain decimal indices separated by commas, such as "
                                "0,120,240")
    return sorted({int(x) for x in items})


class KeyframeFolder:
    """Colour images named by their frame index (`000120.png`, `120.jpg`), read and checked
    when made."""

    def __init__(self, folder: Path, width: int, height: int, frames: int):
        self.folder = Path(folder)
        try:
            images = sorted(p for p in self.folder.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        except OSError as e:
            raise KeyframeError(f"{self.folder}: cannot list the keyframes "
                                f"({e.strerror})") from None
        if not images:
            raise KeyframeError(f"{self.folder}: no keyframe images (expected colour images "
                                f"named by frame index, e.g. 000120.png)")
        self.frames: dict[int, np.ndarray] = {}
        for path in images:
            if not INDEX.fullmatch(path.stem):
                raise KeyframeError(f"{path}: not named by a frame index (expected e.g. "
                                    "000120.png)")
            index = int(path.stem)
            if index in self.frames:
                raise KeyframeError(f"{path}: a second keyframe for frame {index}")
            if frames and index >= frames:
                raise KeyframeError(f"{path}: frame {index} is past the input's end (it has "
                                    f"{frames} frames, 0..{frames - 1})")
            rgb, orientation = read_image(path)
            self.frames[index] = fit_keyframe(rgb, width, height, str(path), orientation)
        self.last = max(self.frames)

    def __call__(self, items: Iterable) -> Iterator:
        seen = -1
        for item in items:
            item.keyframe = self.frames.get(item.index)
            seen = item.index
            yield item
        if seen < self.last:  # the input's length was unknown up front
            raise KeyframeError(f"{self.folder}: keyframe for frame {self.last} is past the "
                                f"input's end (it has {seen + 1} frames)")


class KeyframeVideo:
    """A colour video as long as the input, used at `frames` or, with `at_cuts`, at every
    scene start of the input (frame 0 included)."""

    def __init__(self, path: Path, width: int, height: int, frames: int,
                 at: list[int] | None = None, at_cuts: bool = False):
        if (at is None) == (not at_cuts):
            raise KeyframeError(f"{path}: a keyframe video needs --keyframe-frames or "
                                "--keyframe-at-cuts (one of them)")
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise KeyframeError(f"{path}: cannot be read ({e.strerror})") from None
        if not stat.S_ISREG(mode):  # a FIFO would block the decoder's open
            raise KeyframeError(f"{path}: is {file_kind(mode)}, not a regular file; expected a "
                                "colour video file")
        try:
            self.source = Source(path)
        except VideoError as e:
            raise KeyframeError(str(e)) from e
        self.path, self.width, self.height = Path(path), width, height
        self.at, self.at_cuts = set(at or ()), at_cuts
        if frames and self.source.frames and self.source.frames != frames:
            raise KeyframeError(f"{path}: {self.source.frames} frames, the input {frames}; "
                                "expected a keyframe video as long as the input")
        if at and frames and max(at) >= frames:
            raise KeyframeError(f"--keyframe-frames: frame {max(at)} is past the input's end "
                                f"(it has {frames} frames, 0..{frames - 1})")

    def __call__(self, items: Iterable) -> Iterator:
        colour = self.source.read()
        scene, last = None, -1
        try:
            for item in items:
                frame = next(colour, None)
                if frame is None:
                    raise KeyframeError(f"{self.path}: ends at frame {item.index}, before the "
                                        "input; expected a keyframe video as long as the input")
                at_cut = self.at_cuts and item.scene != scene
                if at_cut and is_grey(frame.rgb):  # a fade from black, a title card
                    print(f"keyframes: {self.path} frame {item.index}: a scene start without "
                          "colour, not used", file=sys.stderr)
                    at_cut = False
                wanted = item.index in self.at or at_cut
                item.keyframe = (fit_keyframe(frame.rgb, self.width, self.height,
                                              f"{self.path} frame {item.index}")
                                 if wanted else None)
                scene, last = item.scene, item.index
                yield item
            if next(colour, None) is not None:  # a length the containers did not declare
                raise KeyframeError(f"{self.path}: longer than the input ({last + 1} frames); "
                                    "expected a keyframe video as long as the input")
        except VideoError as e:
            raise KeyframeError(str(e)) from e
        finally:
            colour.close()
        if self.at and max(self.at) > last:
            raise KeyframeError(f"--keyframe-frames: frame {max(self.at)} is past the input's "
                                f"end (it has {last + 1} frames)")


class TruthKeyframes:
    """tricolor-eval's keyframe protocols: the truth's frame (the item's own RGB) at every
    scene start ("first") or at every N-th frame ("every:N")."""

    def __init__(self, protocol: str):
        self.every = None
        if protocol != "first":
            match = re.fullmatch(r"every:(\d+)", protocol)
            if not match or int(match[1]) < 2:  # every:1 would leave no frame to score
                raise KeyframeError(f"--keyframes {protocol!r}: expected none, first or "
                                    "every:N with N >= 2")
            self.every = int(match[1])
        self.protocol = protocol

    def describe(self) -> str:
        if self.every is None:
            return "keyframes: the truth's first frame of every scene"
        return f"keyframes: the truth's frame at every {self.every}-th frame (0, {self.every}, ...)"

    def __call__(self, items: Iterable) -> Iterator:
        scene = None
        for item in items:
            given = item.scene != scene if self.every is None else item.index % self.every == 0
            item.keyframe = item.rgb if given else None
            scene = item.scene
            yield item
