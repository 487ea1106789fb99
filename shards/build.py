"""`tricolor-shards build`: videos -> shuffled WebDataset shards of frame triplets.

Two passes, so that samples can be written in a globally shuffled order (DALI's shuffle
buffer only mixes samples that are near each other in a shard) without holding every frame
in memory:

1. spool: decode each video (in parallel with --workers), resize, detect scene cuts, and
   JPEG-encode every frame once into a spool file under DIR/.spool-*.partial/;
2. write: form the triplets (t-1, t, t+1) that do not cross a cut, split train/val by whole
   scenes (or whole videos), shuffle, and write shards that reference the spooled JPEGs.

Every file is written under a `.partial` name and renamed when complete; the manifest is
written last, so a directory with a manifest is always whole. A whole build then scans its
shards once as the loader would and writes `good-samples.json` beside the manifest, which
loaders read instead of scanning every shard at every start (`trainer.data.samples`).

Rebuilding (`--overwrite`) never takes the old data set apart before the new one is whole:
each build names its shards with its own build id (`train-<id>-000000.tar`), writes them
beside the old ones, publishes its manifest with one atomic rename, and only then deletes
the files the old manifest(s) listed. A crash, Ctrl-C or full disk at any point leaves the
old or the new data set whole. Only files that a manifest in the folder lists, or the record
a build writes before its first file (`.tricolor-build-<id>.json`, for what a killed build
left), are ever removed: never a file for its name alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import secrets
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

from shards import flow
from shards.atomic import PARTIAL_SUFFIX, fsync_dir, write_json_atomic, write_json_partial
from shards.manifest import (
    FORMAT,
    MANIFEST,
    SLICE_MANIFEST,
    ManifestError,
    load_manifest,
    manifest_name,
    tool_file_slice,
    tricolor_version,
)
from shards.scan import GOOD_SAMPLES, write_good_samples
from shards.scenes import SceneCuts
from shards.tario import ShardWriter
from shards.video import VideoError, VideoInfo, decode_frames

SPLITS = ("train", "val")
MEMBERS = ("prev.jpg", "cur.jpg", "next.jpg")  # frames t-1, t, t+1
# The short side of 8K UHD video. Beyond it a frame is over 100 MB of RGB (20000 would be
# 2.4 GB a frame) and, for any real source, only an upsampled copy: surely a typo.
MAX_SHORT_SIDE = 4320
# A frame is grey when at most 1% of its pixels have R, G and B further apart than this
# (a few levels of chroma noise); a video whose every frame is grey teaches no colour.
GREY_LEVELS = 8
GREY_OUTLIERS = 0.01


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
    flow: bool = False  # also store optical flow and occlusion masks (shards/flow.py)

    def check(self) -> None:
        if not 16 <= self.short_side <= MAX_SHORT_SIDE or self.short_side % 2:
            raise ValueError(
                f"--short-side must be an even number in 16..{MAX_SHORT_SIDE} (8K's short "
                f"side; larger frames only upsample the source), got {self.short_side}"
            )
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
    colour: bool = False  # whether some frame is not grey (see `is_grey`)
    # with --flow: (offset, length) of each frame's flow to its previous / next frame
    flow_prev: list[tuple[int, int] | None] = field(default_factory=list)
    flow_next: list[tuple[int, int] | None] = field(default_factory=list)


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


def unit_hash(unit: str, seed: int) -> float:
    """A stable number in [0, 1) per split unit: the same scene lands in the same split
    whichever slice, worker or machine builds it."""
    h = hashlib.sha256(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(units: dict[str, int], val_fraction: float, seed: int) -> dict[str, str]:
    """Map each unit (scene or video id, with its triplet count) to "train" or "val".

    A unit goes to val when its hash is below `val_fraction`; for small collections, where
    hashing can leave one side empty, the lowest/highest-hash unit is moved so that both
    splits are populated whenever there are at least two units. Train is never left empty:
    a lone unit always goes to train (val then stays empty; the build warns).
    """
    ranked = sorted(units, key=lambda u: unit_hash(u, seed))
    split = {u: "val" if unit_hash(u, seed) < val_fraction else "train" for u in ranked}
    if val_fraction > 0 and len(ranked) >= 2 and "val" not in split.values():
        split[ranked[0]] = "val"
    if ranked and "train" not in split.values():
        split[ranked[-1]] = "train"
    return split


def read_spooled(spool, where: tuple[int, int]) -> bytes:
    """The bytes at `where` = (offset, length) of a video's spool file (a frame's JPEG, or a
    flow PNG)."""
    offset, length = where
    spool.seek(offset)
    return spool.read(length)


def write_split(
    out_dir: Path,
    split: str,
    tag: str,
    samples: list[tuple[SpooledVideo, int]],
    params: BuildParams,
) -> list[dict]:
    """Write `samples` (already shuffled) into shards `<split>-<tag><i>.tar`, where `tag`
    holds the slice and the build id (see `build`)."""
    shards: list[dict] = []
    writer = None
    try:
        for i, (video, t) in enumerate(tqdm(samples, desc=f"write {split}", unit="sample")):
            if i % params.samples_per_shard == 0:
                if writer is not None:
                    shards.append(writer.close())
                number = i // params.samples_per_shard
                writer = ShardWriter(out_dir / f"{split}-{tag}{number:06d}.tar")
            scene = video.scenes[t]
            with open(video.spool, "rb") as spool:
                members = {m: read_spooled(spool, video.offsets[t + d])
                           for m, d in zip(MEMBERS, (-1, 0, 1))}
                if params.flow:
                    for m, where in zip(flow.MEMBERS, (video.flow_prev[t], video.flow_next[t])):
                        members[m] = read_spooled(spool, where)
            meta = {
                # Per-member CRC-32: damaged JPEG data with intact markers decodes to wrong
                # pixels; the loader's start-up scan and `verify` compare these.
                "crc32": {m: zlib.crc32(data) for m, data in members.items()},
                "source": video.path,
                "frame": t,
                "fps": video.info.fps,
                "scene": scene,
                "width": video.info.width,
                "height": video.info.height,
            }
            members["json"] = json.dumps(meta).encode()
            writer.write(f"{video.name}_s{scene:04d}_f{t:06d}", members)
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return shards


@dataclass
class OldDataSet:
    """What `out_dir` holds of earlier builds that this build replaces (see `find_old`)."""

    blocking: list[Path]  # entries that make a build without --overwrite refuse
    leftovers: list[Path]  # files of killed builds their records name: removed before building
    manifests: list[Path]  # manifests replaced or removed once the new one is published
    listed: set[str]  # shard files those manifests list: deleted after them
    records: int = 0  # manifests and build records found: 0 means no data set is here


def listed_files(manifest_path: Path, log) -> set[str] | None:
    """The shard file names a manifest lists; None (with a warning) when it cannot be read."""
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as e:
        log(f"warning: {e}; no file it may list is removed", file=sys.stderr)
        return None
    return {s[k] for info in manifest["splits"].values() for s in info["shards"]
            for k in ("tar", "index")}


# A build's record of the files it is writing (`.tricolor-build-<id>.json`), written before
# the first of them and removed once its manifest lists them: what a build killed before it
# could clean up leaves behind is found through it, never through its names alone.
JOURNAL_FORMAT = "tricolor-build/1"


def journal_path(out_dir: Path, tag: str) -> Path:
    return out_dir / f".tricolor-build-{tag[:-1]}.json"


def write_journal(out_dir: Path, tag: str, names: list[str]) -> Path:
    """Record that the build `tag` writes `names` and files named `train-<tag>...` and
    `val-<tag>...` in `out_dir`."""
    path = journal_path(out_dir, tag)
    write_json_atomic(path, {"format": JOURNAL_FORMAT, "names": names,
                             "prefixes": [f"{split}-{tag}" for split in SPLITS]})
    return path


def journal_files(out_dir: Path, slice_: str | None = None) -> set[Path]:
    """The files in `out_dir` that build records (of slice `slice_`: "" a whole build, "sKofN"
    a slice; None: any) name, the records included. A record that cannot be read names
    nothing but itself."""
    found: set[Path] = set()
    if not out_dir.is_dir():
        return found
    entries = list(out_dir.iterdir())
    for journal in entries:
        if not journal.name.startswith(".tricolor-build-"):
            continue
        which = tool_file_slice(journal.name)
        if which is None or (slice_ is not None and which != slice_):
            continue
        found.add(journal)
        try:
            record = json.loads(journal.read_text())
            names, prefixes = set(record["names"]), tuple(record["prefixes"])
            if record["format"] != JOURNAL_FORMAT or not all(
                    isinstance(x, str) and x for x in (*names, *prefixes)):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.update(p for p in entries if tool_file_slice(p.name) is not None
                     and (p.name in names or p.name.startswith(prefixes)))
    return found


def find_old(out_dir: Path, slice_: tuple[int, int] | None, log) -> OldDataSet:
    """The earlier data set(s) in `out_dir` that a build of `slice_` (None: a whole build)
    replaces. A whole build replaces every manifest and the files they list; a slice K/N
    replaces its own `manifest-sKofN.json` and its files, and invalidates the merged
    `manifest.json` (it lists them too). Only files that a manifest or a build record
    (`journal_files`) lists are ever removed: a file that merely carries this tool's names
    (a user's `train-000000.tar`) is kept."""
    if not out_dir.is_dir():
        return OldDataSet([], [], [], set())
    entries = sorted(out_dir.iterdir())
    manifests = [p for p in entries if p.name == MANIFEST or SLICE_MANIFEST.match(p.name)]
    lists = [listed_files(m, log) for m in manifests]
    listed_anywhere = set().union(*(names for names in lists if names is not None))
    unreadable = None in lists  # then any shard may be one it lists: keep them all
    mine = "" if slice_ is None else f"s{slice_[0]}of{slice_[1]}"
    recorded = journal_files(out_dir, None if slice_ is None else mine)
    if slice_ is None:
        listed, blocking = listed_anywhere, entries
    else:
        own = out_dir / manifest_name(slice_)
        manifests = [m for m in manifests if m in (own, out_dir / MANIFEST)]
        # This slice's shards by their names: those its own and the merged manifest list.
        listed = {name for name in listed_anywhere if tool_file_slice(name) == mine}
        blocking = manifests + [p for p in entries if tool_file_slice(p.name) == mine]
    # A record outlives its build's publication when killed right after it: what the
    # manifest lists stays.
    leftovers = sorted(p for p in recorded if p.name not in listed_anywhere
                       and not (unreadable and p.suffix in (".tar", ".idx")))
    records = len(manifests) + sum(p.name.startswith(".tricolor-build-") for p in recorded)
    return OldDataSet(blocking, leftovers, manifests, listed, records)


def remove_quietly(paths) -> None:
    """Remove files and spool folders, ignoring what is already gone or cannot be removed:
    this runs while an error (a full disk, Ctrl-C) is already on its way to the user."""
    for p in paths:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def retire(old: OldDataSet, new_manifest: Path, log) -> None:
    """After `new_manifest` is published (it replaced the old one of its name): remove the
    other old manifests first (from then on none points at a missing shard), then the shard
    files they listed."""
    out_dir = new_manifest.parent
    for manifest in old.manifests:
        if manifest != new_manifest:
            manifest.unlink(missing_ok=True)
    fsync_dir(out_dir)
    keep = listed_files(new_manifest, log) or set()
    for name in sorted(old.listed - keep):
        # Only this tool's own shard names: a hand-edited or downloaded manifest may list
        # any file of the folder (a user's backup.tar), which is not ours to delete.
        if name.endswith((".tar", ".idx")) and tool_file_slice(name) is not None:
            (out_dir / name).unlink(missing_ok=True)


def build(
    videos: list[Path],
    out_dir: Path,
    params: BuildParams,
    workers: int = 1,
    overwrite: bool = False,
    log=print,
    skipped_inputs: list[dict] | tuple = (),
) -> BuildResult:
    """Build shards from `videos` into `out_dir`; raises ValueError if no input is usable.
    `skipped_inputs` (e.g. broken symlinks `find_videos` left out) go into the manifest's
    "skipped" list. See the module docstring for what `overwrite` replaces, and when."""
    params.check()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: is a file, not a folder")
    if params.slice:
        k, n = params.slice
        videos = videos[k::n]
    old = find_old(out_dir, params.slice, log)
    if old.blocking and not overwrite:
        first = old.blocking[0].name
        if not old.records:
            raise FileExistsError(
                f"{out_dir} already holds {len(old.blocking)} entries (e.g. {first}) and no "
                "tricolor data set: choose an empty folder, or pass --overwrite to build beside "
                "them (only files a tricolor manifest lists are ever removed)")
        raise FileExistsError(
            f"{out_dir} already holds {len(old.blocking)} entries (e.g. {first}); "
            "pass --overwrite to replace the data set built there"
        )
    remove_quietly(old.leftovers)  # of killed builds, as their records list them
    out_dir.mkdir(parents=True, exist_ok=True)
    # Unique per build: the new shards never take the old ones' names.
    prefix = f"s{params.slice[0]}of{params.slice[1]}-" if params.slice else ""
    tag = f"{prefix}{secrets.token_hex(4)}-"
    spool_dir = out_dir / f".spool-{tag[:-1]}{PARTIAL_SUFFIX}"
    manifest_path = out_dir / manifest_name(params.slice)
    published = None
    journal = None
    try:
        journal = write_journal(out_dir, tag, [spool_dir.name,
                                               manifest_path.name + PARTIAL_SUFFIX])
        spool_dir.mkdir()
        skipped = [dict(s) for s in skipped_inputs]
        for s in skipped:
            log(f"skipped: {s['reason']}", file=sys.stderr)
        spooled, skipped = _spool_all(videos, spool_dir, params, workers, log, skipped)
        manifest = _write_all(spooled, skipped, out_dir, tag, params, log)
        partial = write_json_partial(manifest_path, manifest)
        published = os.stat(partial).st_ino
        os.replace(partial, manifest_path)  # the one step that switches to the new data set
    except BaseException as e:
        if not _is_published(manifest_path, published):
            remove_quietly(_files_of_build(out_dir, tag, manifest_path))
            remove_quietly([journal] if journal else [])
        if isinstance(e, OSError) and e.filename is None:  # name the folder being written
            raise OSError(e.errno, e.strerror or str(e), str(out_dir)) from e
        raise
    finally:
        remove_quietly([spool_dir])
    fsync_dir(out_dir)
    retire(old, manifest_path, log)
    remove_quietly([journal])  # the manifest lists this build's files now
    if not params.slice:  # a slice's shards are indexed by `merge`, with the others
        index_good_samples(out_dir, log)
    return BuildResult(manifest, skipped)


def index_good_samples(out_dir: Path, log=print, records=None) -> Path | None:
    """Scan the shards once, as every loader would at start-up, and write the result beside
    the manifest (`shards.scan.write_good_samples`): loaders then read that one file
    instead of every shard. `records`: the result of `verify`'s scan, written as it is.
    Optional: where it cannot be written, loaders scan (and say so)."""
    try:
        return write_good_samples(out_dir, records=records)
    except ManifestError:  # no sound manifest: `verify` names what is wrong with it
        return None
    except OSError as e:
        log(f"warning: cannot write {out_dir / GOOD_SAMPLES} ({e.strerror or e}): training "
            "will scan every shard at start-up", file=sys.stderr)
        return None


def _is_published(manifest_path: Path, inode: int | None) -> bool:
    """Whether the rename that publishes the manifest happened (an interrupt can arrive
    right after it): then its shards are the data set and must stay."""
    try:
        return inode is not None and os.stat(manifest_path).st_ino == inode
    except OSError:
        return False


def _files_of_build(out_dir: Path, tag: str, manifest_path: Path) -> list[Path]:
    """Every file of the build tagged `tag`, published or partial, and its manifest partial."""
    names = [p for p in out_dir.iterdir() if p.name.startswith((f"train-{tag}", f"val-{tag}"))]
    return names + [manifest_path.with_name(manifest_path.name + PARTIAL_SUFFIX)]


def _spool_all(videos, spool_dir, params, workers, log, skipped):
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


def _write_all(spooled, skipped, out_dir, tag, params, log):
    """Pass 2: split, shuffle and write the shards; return the manifest (not yet written)."""
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
            "by, a split never cuts one in two, and train always gets one; "
            "training on these shards runs without validation",
            file=sys.stderr,
        )
    rng = random.Random(params.seed)
    splits = {}
    for split in SPLITS:
        rng.shuffle(samples[split])
        shards = write_split(out_dir, split, tag, samples[split], params)
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
        "members": list(MEMBERS) + (list(flow.MEMBERS) if params.flow else []) + ["json"],
        **({"flow": flow.METHOD} if params.flow else {}),
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
    return manifest


def _unit(video: SpooledVideo, t: int, params: BuildParams) -> str:
    """The split unit of frame t: its video or its scene. Not the path: the same videos must
    split the same way wherever they are stored."""
    if params.split_by == "video":
        return video.split_id
    return f"{video.split_id}#{video.scenes[t]}"


__all__ = ["BuildParams", "build", "MANIFEST"]
