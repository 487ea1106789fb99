"""Pass 2 of a shard build: form the triplets (t-1, t, t+1) that do not cross a scene cut,
split them train/val by whole scenes (or whole videos), shuffle them, and write shards of
samples read from the spool (`shards.spool`); return the manifest that lists them.

The split is a pure function of the videos' names and sizes and the seed (`unit_hash`): the
same scene lands in the same split whichever slice, worker or machine builds it. Shards are
named `<split>-<tag><number>.tar`, the tag holding the slice and the build id, and each is
written under a `.partial` name and renamed when complete (`shards.tario.ShardWriter`).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from shards import flow
from shards.manifest import FORMAT, tricolor_version
from shards.params import SPLITS, BuildParams
from shards.spool import SpooledVideo, read_spooled, triplet_centres
from shards.tario import ShardWriter

MEMBERS = ("prev.jpg", "cur.jpg", "next.jpg")  # frames t-1, t, t+1


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


def write_all(spooled, skipped, out_dir, tag, params, log):
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
