"""Output for `tricolor-colorize` (PyAV): a video (H.264, upright, the input's frame
timestamps, its audio packets copied unchanged) or a folder of PNG frames marked by a
FRAMES_MARKER file.

Output is written under a temporary name in the destination folder and renamed when
complete: an interrupted or failed run never leaves a partial file under the final name, and
what a run killed outright (SIGKILL) left under its temporary name is removed by the next run
for that output on the same host. The output is never the input, and an existing one is
replaced only if it is a video file or a frames folder this module wrote; every refusal is
an OutputError naming the path. The input side is `inference.video_in`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from shards.atomic import publish

# Output containers that take H.264 (and, usually, the input's audio codec as it is).
VIDEO_OUT_SUFFIXES = {".mp4", ".mkv", ".mov", ".m4v", ".avi"}
# The output keeps the input's chroma subsampling when it is one of these (full range
# "yuvj" inputs map to their limited-range twins), else 4:2:0, which every player takes.
# 4:2:0 stores chroma at half resolution: where a saturated colour meets an edge, the
# luminance of the decoded RGB moves a little (Y PSNR about 40-45 dB against the input);
# 4:4:4 keeps it (and PNG frames keep it exactly, up to 8-bit rounding).
PIX_FMTS = {"yuv420p": "yuv420p", "yuvj420p": "yuv420p", "yuv422p": "yuv422p",
            "yuvj422p": "yuv422p", "yuv444p": "yuv444p", "yuvj444p": "yuv444p"}
DEFAULT_CRF = 16  # x264 constant rate factor: 0 lossless, 18 "visually lossless", 23 default
DEFAULT_PRESET = "medium"  # x264 speed / compression trade-off: ultrafast ... veryslow
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                "slower", "veryslow")

# Every frames folder this tool writes holds this file: `--overwrite` replaces only a folder
# that has it and nothing but its frames (FRAME_NAME).
FRAMES_MARKER = ".tricolor-frames"
FRAME_NAME = re.compile(r"frame_\d{6,}\.png")

# Temporary outputs carry the host and the process id: a later run can tell one whose writer
# is gone (a process of this host no longer running) from one still being written, here or
# by another host sharing the folder.
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


class OutputError(Exception):
    """An output path that cannot be written; the message names it."""


def output_kind(path: Path) -> str:
    """"video" for a path with a video suffix, "frames" for a folder (an existing one or a
    path without suffix); anything else is an OutputError."""
    if path.suffix.lower() in VIDEO_OUT_SUFFIXES:
        return "video"
    if path.is_dir() or not path.suffix:
        return "frames"
    raise OutputError(f"{path}: unknown output format {path.suffix!r}; name a video "
                      f"({', '.join(sorted(VIDEO_OUT_SUFFIXES))}) or a folder for PNG frames")


def check_output(path: Path, overwrite: bool, source: Path | None = None) -> None:
    """Fail early, before any work, when `path` cannot be written: its folder is missing or
    read-only, it is the input `source` (or a folder inside or around it), or it exists and
    may not be replaced (see `check_replaceable`)."""
    kind = output_kind(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the folder {parent} is not writable")
    if source is not None:
        check_not_input(path, source)
    if path.exists() or path.is_symlink():
        if not overwrite and not (path.is_dir() and not any(path.iterdir())):
            raise OutputError(f"{path}: exists; pass --overwrite to replace it")
        check_replaceable(path, kind)


def check_not_input(path: Path, source: Path) -> None:
    """OutputError when the output `path` names the input `source` in any spelling (relative,
    `..`, a symbolic or hard link), contains it, or lies inside an input folder."""
    try:
        out, src = path.resolve(), source.resolve()
    except (OSError, RuntimeError) as e:  # e.g. a symbolic link loop
        raise OutputError(f"{path}: cannot tell whether it is the input {source} ({e})") from e
    if out == src or path.exists() and source.exists() and os.path.samefile(path, source):
        raise OutputError(f"{path}: is the input {source}; name another output")
    if out in src.parents:
        raise OutputError(f"{path}: contains the input {source}; name another output")
    if source.is_dir() and src in out.parents:
        raise OutputError(f"{path}: lies inside the input folder {source}; name another "
                          "output")


def check_replaceable(path: Path, kind: str) -> None:
    """OutputError unless `--overwrite` may replace the existing `path`: for a video, a
    file (not a folder); for frames, an empty folder or one this tool wrote (its marker
    file, FRAMES_MARKER, and nothing but its frames), never a folder that holds anything
    else: the tool removes only what it made."""
    if kind == "video":
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; not replaced by a video")
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"{path}: not a folder of frames written by tricolor-colorize; "
                          "not replaced (name another output)")
    names = os.listdir(path)
    if not names:
        return
    if FRAMES_MARKER not in names:
        raise OutputError(f"{path}: not replaced: it was not written by tricolor-colorize (no "
                          f"{FRAMES_MARKER} marker); name another output or remove it yourself")
    others = sorted(n for n in names if n != FRAMES_MARKER and not (
        FRAME_NAME.fullmatch(n) and (path / n).is_file() and not (path / n).is_symlink()))
    if others:
        raise OutputError(f"{path}: not replaced: it holds files that are not its frames (e.g. "
                          f"{others[0]!r}); name another output or remove them yourself")


def temp_name(path: Path, pid: int | None = None) -> Path:
    """Where the output `path` is written until complete: the same folder (so the final rename
    is atomic), hidden, unique per host and process, the same suffix (FFmpeg picks the
    container format from it)."""
    pid = os.getpid() if pid is None else pid
    return path.with_name(f".{path.stem}.partial-{HOST}-{pid}{path.suffix}")


def remove_stale_temporaries(path: Path) -> list[tuple[Path, int]]:
    """Remove the temporaries of output `path` that runs killed outright (SIGKILL, the
    out-of-memory killer) left, and return them with their process ids. Only those of this
    host whose process is no longer running, and only what a sink writes (a video file; a
    folder holding nothing but the frames marker and frames): never one of a live process, of
    another host (it cannot be checked from here) or anything else under a similar name."""
    prefix, suffix = f".{path.stem}.partial-{HOST}-", path.suffix
    folder = path.absolute().parent
    try:
        names = os.listdir(folder)
    except OSError:
        return []  # check_output refuses an unreadable folder before this matters
    kind, removed = output_kind(path), []
    for name in sorted(names):
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):len(name) - len(suffix)]
        if not re.fullmatch(r"[0-9]+", pid) or _running(int(pid)):
            continue
        tmp = folder / name
        try:
            if kind == "video" and tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
            elif kind == "frames":
                check_replaceable(tmp, "frames")  # an empty folder or our own frames only
                shutil.rmtree(tmp)
            else:
                continue
        except (OSError, OutputError):
            continue  # not ours, or removed meanwhile by another run: left as it is
        removed.append((tmp, int(pid)))
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` of this host may be running (True when that cannot be told)."""
    if pid == os.getpid():
        return False  # this run has made no temporary yet: a dead process's, pid reused
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # another user's process, or a pid beyond any system's: left alone
    return True


class FrameFolderSink:
    """PNG frames `frame_000000.png`, ... and the FRAMES_MARKER file, in a folder that
    appears only when complete."""

    def __init__(self, path: Path, overwrite: bool):
        self.path, self.overwrite = Path(path), overwrite
        self.tmp = temp_name(self.path)
        try:
            self.tmp.mkdir()  # fails on anything already there, which is then left alone
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write here ({e})") from e
        try:
            (self.tmp / FRAMES_MARKER).write_text("frames written by tricolor-colorize\n")
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.path}: cannot write here ({e})") from e
        self.count = 0

    def write(self, rgb: np.ndarray, pts: int | None = None) -> None:
        Image.fromarray(rgb).save(self.tmp / f"frame_{self.count:06d}.png", compress_level=1)
        self.count += 1

    def commit(self) -> None:
        old = None
        if self.path.exists() or self.path.is_symlink():
            # Checked again: the folder may have changed since the run started.
            check_output(self.path, self.overwrite)
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old)  # an empty folder or our own frames (check_replaceable)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class VideoSink:
    """H.264 video at the source's frame rate and timestamps, with the source's audio stream
    copied packet for packet (interleaved by time as the video is written)."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction,
                 time_base: Fraction | None, audio_from: Path | None, crf: int = DEFAULT_CRF,
                 pix_fmt: str | None = None, preset: str = DEFAULT_PRESET):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.fps = fps
        # Timestamps: the source's, in its time base, so variable frame rates and the sync
        # with the copied audio survive; for image folders 0, 1, 2, ... frame durations.
        self.time_base = time_base or 1 / fps
        self.step = max(1, round(1 / (fps * self.time_base)))  # one frame in time_base units
        self.last_pts: int | None = None
        self.out = self.audio_in = None
        try:
            self.out = av.open(str(self.tmp), "w")
        except (av.error.FFmpegError, OSError) as e:
            raise OutputError(f"{self.path}: cannot write here ({e})") from e
        try:
            stream = self.out.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            pix_fmt = PIX_FMTS.get(pix_fmt or "", "yuv420p")
            if width % 2 or height % 2:  # subsampled chroma needs even sides
                pix_fmt = "yuv444p"
            stream.pix_fmt = pix_fmt
            stream.options = {"crf": str(crf), "preset": preset}
            stream.time_base = self.time_base
            stream.codec_context.time_base = self.time_base
            self.video = stream
            if audio_from is not None:
                self.audio_in = av.open(str(audio_from))
                src = self.audio_in.streams.audio[0]
                self.audio = self.out.add_stream_from_template(src)
                self.audio_packets = self.audio_in.demux(src)
                self.next_audio = None
        except (av.error.FFmpegError, ValueError) as e:
            self.abort()
            raise OutputError(f"{self.path}: cannot set up the output streams ({e})") from e

    def _mux(self, packets) -> None:
        for packet in packets:
            if self.audio_in is not None and packet.pts is not None and packet.time_base:
                self._mux_audio(packet.pts * packet.time_base)  # audio up to this frame
            self.out.mux(packet)

    def _mux_audio(self, until: float | None) -> None:
        """Copy the source's audio packets up to time `until` (seconds; None: all)."""
        while True:
            if self.next_audio is None:
                packet = next(self.audio_packets, None)
                if packet is None:
                    self.audio_in.close()
                    self.audio_in = None
                    return
                if packet.dts is None or packet.size == 0:  # the demuxer's flush packet
                    continue
                self.next_audio = packet
            p = self.next_audio
            if until is not None and p.pts is not None and p.pts * p.time_base > until:
                return
            p.stream = self.audio
            try:
                self.out.mux(p)
            except av.error.FFmpegError as e:
                raise OutputError(f"{self.path}: cannot copy the audio stream "
                                  f"({self.audio.codec_context.name}) into this container "
                                  f"({e}); choose another, e.g. .mkv") from e
            self.next_audio = None

    def write(self, rgb: np.ndarray, pts: int | None) -> None:
        # Presentation order means increasing timestamps; repair the rare stream that
        # repeats or lacks one, since the encoder refuses them.
        if pts is None or self.last_pts is not None and pts <= self.last_pts:
            pts = 0 if self.last_pts is None else self.last_pts + self.step
        self.last_pts = pts
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = pts, self.time_base
        try:
            self._mux(self.video.encode(frame))
        except av.error.FFmpegError as e:
            raise OutputError(f"{self.path}: writing failed ({e})") from e

    def commit(self) -> None:
        try:
            self._mux(self.video.encode())
            if self.audio_in is not None:
                self._mux_audio(None)
            self.out.close()
        except av.error.FFmpegError as e:
            raise OutputError(f"{self.path}: writing failed ({e})") from e
        publish(self.tmp, self.path)  # fsync, then the atomic rename

    def abort(self) -> None:
        for container in (self.out, self.audio_in):
            if container is not None:
                try:
                    container.close()
                except av.error.FFmpegError:
                    pass  # already failing; the partial file is removed below
        self.audio_in = None
        self.tmp.unlink(missing_ok=True)
