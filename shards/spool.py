"""Pass 1 of a shard build: decode each video (in parallel with `workers`), resize it, detect
its scene cuts, and JPEG-encode every frame once into a spool file (with --flow, also the
flow between neighbouring frames), so that pass 2 (`shards.write`) can write samples in any
order without holding frames in memory.

A spool file is the encoded frames back to back; a SpooledVideo says where each one lies
(`read_spooled` reads it back) and which scene it belongs to. A video that cannot be decoded,
has no frame triplet within one scene, or is grey throughout is skipped, with the reason
recorded for the manifest.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from shards import flow
from shards.params import BuildParams
from shards.scenes import SceneCuts
from shards.video import VideoError, VideoInfo, decode_frames

# A frame is grey when at most 1% of its pixels have R, G and B further apart than this
# (a few levels of chroma noise); a video whose every frame is grey teaches no colour.
GREY_LEVELS = 8
GREY_OUTLIERS = 0.01


@dataclass
class SpooledVideo:
    """A decoded video: where each frame's JPEG lies in the spool file, and its scene."""

    path: str
    name: str  # unique, dot-free id used in sample keys
    split_id: str  # what the split hashes: file name and size, the same on every machine
    info: VideoInfo
    spool: str
    offsets: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) per frame
    scenes: list[int] = field(default_factory=list)  # scene id per frame
    colour: bool = False  # whether some frame is not grey (see `is_grey`)
    # with --flow: (offset, length) of each frame's flow to its previous / next frame
    flow_prev: list[tuple[int, int] | None] = field(default_factory=list)
    flow_next: list[tuple[int, int] | None] = field(default_factory=list)


def video_name(path: Path) -> str:
    """A readable, unique, dot-free id: the file stem plus a hash of the full path."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:40]
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): chroma is exactly what a colorizer learns to predict.
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def is_grey(rgb: np.ndarray) -> bool:
    """Whether R, G and B agree within GREY_LEVELS almost everywhere in this frame."""
    spread = rgb.max(axis=2) - rgb.min(axis=2)  # uint8, max >= min: no wrap-around
    return np.count_nonzero(spread > GREY_LEVELS) <= GREY_OUTLIERS * spread.size


def spool_video(path: Path, spool_file: Path, params: BuildParams, progress=None) -> SpooledVideo:
    """Pass 1 for one video: decode, resize, detect cuts, JPEG-encode into `spool_file`."""
    info, frames = decode_frames(path, params.short_side)
    split_id = f"{path.name}:{path.stat().st_size}"
    spooled = SpooledVideo(str(path), video_name(path), split_id, info, str(spool_file))
    cuts = SceneCuts(info.fps, params.scene_threshold)

    def spool(data: bytes) -> tuple[int, int]:
        where = (out.tell(), len(data))
        out.write(data)
        return where

    previous = None
    with open(spool_file, "wb") as out:
        for rgb in frames:
            spooled.offsets.append(spool(encode_jpeg(rgb, params.quality)))
            spooled.scenes.append(cuts.push(rgb))
            spooled.colour = spooled.colour or not is_grey(rgb)
            if params.flow:  # the pair (previous, this frame), in both directions
                spooled.flow_prev.append(None)
                spooled.flow_next.append(None)
                if previous is not None:
                    forward, backward = flow.pair(previous, rgb)
                    spooled.flow_next[-2] = spool(forward)
                    spooled.flow_prev[-1] = spool(backward)
                previous = rgb
            if progress is not None:
                progress(1)
    return spooled


def _spool_worker(path: Path, spool_file: Path, params: BuildParams):
    try:
        return spool_video(path, spool_file, params)
    except VideoError as e:
        return str(e)


def triplet_centres(scenes: list[int]) -> list[int]:
    """Frames t whose neighbours t-1 and t+1 exist and lie in the same scene as t."""
    return [t for t in range(1, len(scenes) - 1) if scenes[t - 1] == scenes[t] == scenes[t + 1]]


def read_spooled(spool, where: tuple[int, int]) -> bytes:
    """The bytes at `where` = (offset, length) of a video's spool file (a frame's JPEG, or a
    flow PNG)."""
    offset, length = where
    spool.seek(offset)
    return spool.read(length)


def spool_all(videos, spool_dir, params, workers, log, skipped):
    """Spool `videos` into `spool_dir`: the usable ones, and `skipped` with each unusable
    one added (and logged) with its reason. ValueError when none is usable."""
    spooled: list[SpooledVideo] = []
    with tqdm(desc="decode", unit="frame") as bar:
        if workers <= 1:
            results = []
            for i, path in enumerate(videos):
                try:
                    results.append(spool_video(path, spool_dir / f"{i}.jpgs", params, bar.update))
                except VideoError as e:
                    results.append(str(e))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {
                    pool.submit(_spool_worker, path, spool_dir / f"{i}.jpgs", params): i
                    for i, path in enumerate(videos)
                }
                results = [None] * len(videos)
                for future in as_completed(futures):
                    results[futures[future]] = r = future.result()
                    if isinstance(r, SpooledVideo):
                        bar.update(len(r.offsets))
    for path, r in zip(videos, results):
        if isinstance(r, str):
            skipped.append({"path": str(path), "reason": r})
            log(f"skipped: {r}", file=sys.stderr)
        elif not triplet_centres(r.scenes):
            reason = (
                f"{path}: too short for one triplet ({len(r.offsets)} frames, "
                f"{len(set(r.scenes))} scenes; a triplet needs 3 frames in one scene)"
            )
            skipped.append({"path": str(path), "reason": reason})
            log(f"skipped: {reason}", file=sys.stderr)
        elif not r.colour:
            reason = (
                f"{path}: greyscale (in every frame R, G and B agree within {GREY_LEVELS} "
                "levels): a colorizer cannot learn colour from it"
            )
            skipped.append({"path": str(path), "reason": reason})
            log(f"skipped: {reason}", file=sys.stderr)
        else:
            spooled.append(r)
    if not spooled:
        raise ValueError(f"no usable input video among {len(videos)} given")
    return spooled, skipped
