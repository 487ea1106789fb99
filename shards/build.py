"""`tricolor-shards build`: videos -> shuffled WebDataset shards of frame triplets.

Two passes, so that samples can be written in a globally shuffled order (DALI's shuffle
buffer only mixes samples that are near each other in a shard) without holding every frame
in memory:

1. spool: decode each video (in parallel with --workers), resize, detect scene cuts, and
   JPEG-encode every frame once into a spool file under DIR/.spool-*.partial/;
2. write: form the triplets (t-1, t, t+1) that do not cross a cut, split train/val by whole
   scenes (or whole videos), shuffle, and write shards that reference the spooled JPEGs.

Every file is written under a `.partial` name and renamed when complete; the manifest is
written last, so a directory with a manifest is always whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import sys
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from shards.atomic import PARTIAL_SUFFIX, write_json_atomic
from shards.manifest import FORMAT, MANIFEST, manifest_name, tricolor_version
from shards.scenes import SceneCuts
from shards.tario import ShardWriter
from shards.video import VideoError, VideoInfo, decode_frames

SPLITS = ("train", "val")
MEMBERS = ("prev.jpg", "cur.jpg", "next.jpg")  # frames t-1, t, t+1


@dataclass
class BuildParams:
    short_side: int = 256
    val_fraction: float = 0.1
    samples_per_shard: int = 1000
    quality: int = 95
    scene_threshold: float = 27.0
    split_by: str = "scene"  # "scene" or "video": the unit that goes wholly to train or val
    seed: int = 0
    slice: tuple[int, int] | None = None  # (K, N): this build handles inputs K, K+N, K+2N, ...

    def check(self) -> None:
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"--short-side must be an even number >= 16, got {self.short_side}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.split_by not in ("scene", "video"):
            raise ValueError(f"--split-by must be 'scene' or 'video', got {self.split_by!r}")
        if self.slice is not None:
            k, n = self.slice
            if not 0 <= k < n:
                raise ValueError(f"--slice K/N needs 0 <= K < N, got {k}/{n}")


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


@dataclass
class BuildResult:
    manifest: dict
    skipped: list[dict]


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


def spool_video(path: Path, spool_file: Path, params: BuildParams, progress=None) -> SpooledVideo:
    """Pass 1 for one video: decode, resize, detect cuts, JPEG-encode into `spool_file`."""
    info, frames = decode_frames(path, params.short_side)
    split_id = f"{path.name}:{path.stat().st_size}"
    spooled = SpooledVideo(str(path), video_name(path), split_id, info, str(spool_file))
    cuts = SceneCuts(info.fps, params.scene_threshold)
    with open(spool_file, "wb") as out:
        for rgb in frames:
            jpeg = encode_jpeg(rgb, params.quality)
            spooled.offsets.append((out.tell(), len(jpeg)))
            out.write(jpeg)
            spooled.scenes.append(cuts.push(rgb))
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


def unit_hash(unit: str, seed: int) -> float:
    """A stable number in [0, 1) per split unit: the same scene lands in the same split
    whichever slice, worker or machine builds it."""
    h = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(units: dict[str, int], val_fraction: float, seed: int) -> dict[str, str]:
    """Map each unit (scene or video id, with its triplet count) to "train" or "val".

    A unit goes to val when its hash is below `val_fraction`; for small collections, where
    hashing can leave one side empty, the lowest/highest-hash unit is moved so that both
    splits are populated whenever there are at least two units.
    """
    ranked = sorted(units, key=lambda u: unit_hash(u, seed))
    split = {u: "val" if unit_hash(u, seed) < val_fraction else "train" for u in ranked}
    if val_fraction > 0 and len(ranked) >= 2:
        if "val" not in split.values():
            split[ranked[0]] = "val"
        if "train" not in split.values():
            split[ranked[-1]] = "train"
    return split


def read_frame(spool, video: SpooledVideo, t: int) -> bytes:
    offset, length = video.offsets[t]
    spool.seek(offset)
    return spool.read(length)


def write_split(
    out_dir: Path,
    split: str,
    prefix: str,
    samples: list[tuple[SpooledVideo, int]],
    params: BuildParams,
) -> list[dict]:
    """Write `samples` (already shuffled) into shards `<split>-<prefix><i>.tar`."""
    shards: list[dict] = []
    writer = None
    try:
        for i, (video, t) in enumerate(tqdm(samples, desc=f"write {split}", unit="sample")):
            if i % params.samples_per_shard == 0:
                if writer is not None:
                    shards.append(writer.close())
                number = i // params.samples_per_shard
                writer = ShardWriter(out_dir / f"{split}-{prefix}{number:06d}.tar")
            scene = video.scenes[t]
            with open(video.spool, "rb") as spool:
                jpegs = [read_frame(spool, video, t + d) for d in (-1, 0, 1)]
            meta = {
                # Per-member CRC-32: damaged JPEG data with intact markers decodes to wrong
                # pixels; the loader's start-up scan and `verify` compare these.
                "crc32": {m: zlib.crc32(j) for m, j in zip(MEMBERS, jpegs)},
                "source": video.path,
                "frame": t,
                "fps": video.info.fps,
                "scene": scene,
                "width": video.info.width,
                "height": video.info.height,
            }
            members = dict(zip(MEMBERS, jpegs))
            members["json"] = json.dumps(meta).encode()
            writer.write(f"{video.name}_s{scene:04d}_f{t:06d}", members)
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return shards


def existing_outputs(out_dir: Path, prefix: str, sliced: bool) -> list[Path]:
    """Files a previous build left in `out_dir` that this build would replace."""
    if not out_dir.exists():
        return []
    if not sliced:
        return sorted(out_dir.iterdir())
    tag = prefix.rstrip("-")
    return sorted(p for p in out_dir.iterdir() if f"-{tag}" in p.name)


def clear_outputs(paths: list[Path]) -> None:
    # Manifests first: from the first deletion on, no manifest points at missing shards.
    for p in sorted(paths, key=lambda p: not p.name.startswith("manifest")):
        if p.is_dir() and p.name.startswith(".spool"):
            shutil.rmtree(p)
        elif p.is_file() and (
            p.suffix in (".tar", ".idx", ".json") or p.name.endswith(PARTIAL_SUFFIX)
        ):
            p.unlink()


def build(
    videos: list[Path],
    out_dir: Path,
    params: BuildParams,
    workers: int = 1,
    overwrite: bool = False,
    log=print,
) -> BuildResult:
    """Build shards from `videos` into `out_dir`; raises ValueError if no input is usable."""
    params.check()
    prefix = f"s{params.slice[0]}of{params.slice[1]}-" if params.slice else ""
    if params.slice:
        k, n = params.slice
        videos = videos[k::n]
    old = existing_outputs(out_dir, prefix, params.slice is not None)
    if old and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(old)} entries (e.g. {old[0].name}); "
            "pass --overwrite to replace them"
        )
    clear_outputs(old)
    out_dir.mkdir(parents=True, exist_ok=True)
    spool_dir = out_dir / f".spool-{prefix or 'all-'}{PARTIAL_SUFFIX.strip('.')}"
    spool_dir.mkdir()
    try:
        spooled, skipped = _spool_all(videos, spool_dir, params, workers, log)
        manifest = _write_all(spooled, skipped, out_dir, prefix, params, log)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
    return BuildResult(manifest, skipped)


def _spool_all(videos, spool_dir, params, workers, log):
    spooled: list[SpooledVideo] = []
    skipped: list[dict] = []
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
        else:
            spooled.append(r)
    if not spooled:
        raise ValueError(f"no usable input video among {len(videos)} given")
    return spooled, skipped


def _write_all(spooled, skipped, out_dir, prefix, params, log):
    units: Counter = Counter()
    for video in spooled:
        for t in triplet_centres(video.scenes):
            units[_unit(video, t, params)] += 1
    split_of = assign_splits(units, params.val_fraction, params.seed)
    samples = defaultdict(list)
    per_source = defaultdict(Counter)
    for video in spooled:
        for t in triplet_centres(video.scenes):
            split = split_of[_unit(video, t, params)]
            samples[split].append((video, t))
            per_source[video.path][split] += 1
    if params.val_fraction > 0 and not samples["val"]:
        log(
            f"warning: the val split is empty: only {len(units)} {params.split_by}(s) to split "
            "by, and a split never cuts one in two",
            file=sys.stderr,
        )
    rng = random.Random(params.seed)
    splits = {}
    for split in SPLITS:
        rng.shuffle(samples[split])
        shards = write_split(out_dir, split, prefix, samples[split], params)
        videos = sorted({v.path for v, _ in samples[split]})
        sizes = sorted({(v.info.width, v.info.height) for v, _ in samples[split]})
        splits[split] = {
            "samples": len(samples[split]),
            "frame_sizes": [list(s) for s in sizes],
            "sources": videos,
            "scenes": len({_unit(v, t, params) for v, t in samples[split]}),
            "shards": shards,
        }
    manifest = {
        "format": FORMAT,
        "tricolor_version": tricolor_version(),
        "params": {**asdict(params), "slice": list(params.slice) if params.slice else None},
        "members": list(MEMBERS) + ["json"],
        "splits": splits,
        "sources": [
            {
                "path": v.path,
                "name": v.name,
                "fps": v.info.fps,
                "frames": len(v.offsets),
                "size": [v.info.width, v.info.height],
                "source_size": [v.info.source_width, v.info.source_height],
                "scenes": len(set(v.scenes)),
                "triplets": dict(per_source[v.path]),
            }
            for v in spooled
        ],
        "skipped": skipped,
    }
    write_json_atomic(out_dir / manifest_name(params.slice), manifest)
    return manifest


def _unit(video: SpooledVideo, t: int, params: BuildParams) -> str:
    """The split unit of frame t: its video or its scene. Not the path: the same videos must
    split the same way wherever they are stored."""
    if params.split_by == "video":
        return video.split_id
    return f"{video.split_id}#{video.scenes[t]}"


__all__ = ["BuildParams", "build", "MANIFEST"]
