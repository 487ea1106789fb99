"""Which samples of a shard directory a loader may read, and the DALI indexes that list them.

Before any loader starts, every rank scans the shards of its split the same way (the DALI
`.idx` files and a few bytes per member, through mmap), so all ranks agree on one list of
readable samples:

- a sample with a missing member, one that runs past the end of a truncated tar, or a JPEG
  member without JPEG start/end markers is skipped with a warning naming the shard and the
  key, and counted;
- the readable samples are trimmed to a multiple of the world size, so that every rank
  reads the same number of samples (uneven step counts hang DDP collectives);
- the survivors are written as fresh `.idx` files in a private directory: DALI then never
  touches a bad sample, because it only reads what the index lists.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shards.manifest import load_manifest
from shards.tario import INDEX_VERSION, index_lines

log = logging.getLogger(__name__)

FRAME_MEMBERS = ("prev.jpg", "cur.jpg", "next.jpg")  # frames t-1, t, t+1


class NoSamplesError(ValueError):
    """The shard list holds no readable sample."""


@dataclass
class ShardSamples:
    tar: Path
    lines: list[str]  # one index line per readable sample (frame members only)


@dataclass
class SampleSet:
    shards: list[ShardSamples]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    trimmed: int = 0  # readable samples left out so every rank reads as many
    frame_sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(s.lines) for s in self.shards)

    def keys(self) -> list[str]:
        return [line.split()[3].split(".", 1)[0] for s in self.shards for line in s.lines]

    def fingerprint(self) -> str:
        """Identifies this exact sample list: a saved loader position only applies to it."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.tar.name.encode())
            for line in s.lines:
                h.update(line.encode())
        return h.hexdigest()[:16]

    def write_indexes(self, directory: Path | None = None) -> tuple[list[str], list[str]]:
        """Write one `.idx` per non-empty shard; return (tar paths, index paths) for DALI."""
        directory = Path(directory or tempfile.mkdtemp(prefix="tricolor-idx-"))
        tars, idxs = [], []
        for i, s in enumerate(self.shards):
            if not s.lines:
                continue
            idx = directory / f"{i:06d}-{s.tar.stem}.idx"
            idx.write_text(f"{INDEX_VERSION} {len(s.lines)}\n" + "\n".join(s.lines) + "\n")
            tars.append(str(s.tar))
            idxs.append(str(idx))
        return tars, idxs


def _jpeg_ok(data: mmap.mmap, offset: int, size: int) -> bool:
    # JPEG starts with SOI (FFD8) and ends with EOI (FFD9), possibly followed by a few
    # padding bytes. Missing markers mean a cut or foreign file: the decoder would fail.
    tail = data[max(offset, offset + size - 64) : offset + size]
    return size > 4 and data[offset : offset + 2] == b"\xff\xd8" and b"\xff\xd9" in tail


def _read_index(tar: Path) -> list[str]:
    index = tar.with_suffix(".idx")
    if index.exists():
        lines = index.read_text().splitlines()
        return [line for line in lines[1:] if line.strip()]
    log.warning("%s: no index beside the shard; indexing it now", tar)
    try:
        return index_lines(tar)[1:]
    except Exception as e:  # a tar cut inside a header: nothing reliable to index
        log.warning("%s: cannot index this shard (%s); skipped", tar, e)
        return []


def scan_shard(tar: Path, skipped: Counter) -> ShardSamples:
    """The readable samples of one shard; each unreadable one is logged and counted."""
    if not tar.exists():
        log.warning("%s: shard listed in the manifest is missing; skipped", tar)
        skipped["missing shard"] += 1
        return ShardSamples(tar, [])
    size = tar.stat().st_size
    if size == 0:
        log.warning("%s: empty shard; skipped", tar)
        skipped["empty shard"] += 1
        return ShardSamples(tar, [])
    good: list[str] = []
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for line in _read_index(tar):
            fields = line.split()
            members = {
                fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            }
            key = fields[3].split(".", 1)[0]
            reason = None
            missing = [m for m in FRAME_MEMBERS if m not in members]
            if missing:
                reason = f"missing component {', '.join(missing)}"
            elif any(members[m][0] + members[m][1] > size for m in FRAME_MEMBERS):
                reason = "truncated tar (member runs past the end of the file)"
            else:
                bad = [m for m in FRAME_MEMBERS if not _jpeg_ok(data, *members[m][:2])]
                if bad:
                    reason = f"undecodable JPEG ({', '.join(bad)}: no JPEG markers)"
            if reason:
                log.warning("%s: sample %s: %s; skipped", tar, key, reason)
                skipped[reason.split(" (")[0]] += 1
                continue
            good.append(
                " ".join(f"{m} {members[m][0]} {members[m][1]} {members[m][2]}"
                         for m in FRAME_MEMBERS)
            )
    return ShardSamples(tar, good)


def scan_split(shard_dir: Path, split: str, world_size: int = 1) -> SampleSet:
    """Scan every shard of `split` and trim to a multiple of `world_size`."""
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise NoSamplesError(f"{shard_dir}/manifest.json: no split {split!r}")
    info = manifest["splits"][split]
    skipped: Counter = Counter()
    shards = [scan_shard(shard_dir / s["tar"], skipped) for s in info["shards"]]
    samples = SampleSet(shards, skipped, frame_sizes=[tuple(s) for s in info["frame_sizes"]])
    total = len(samples)
    if total < world_size:
        raise NoSamplesError(
            f"{shard_dir}: split {split!r} has {total} readable samples "
            f"({sum(skipped.values())} skipped) for {world_size} ranks; need at least one each"
        )
    # Trim from the end: shards are written in shuffled order, so this removes no pattern.
    samples.trimmed = excess = total % world_size
    for shard in reversed(shards):
        if excess == 0:
            break
        cut = min(excess, len(shard.lines))
        shard.lines = shard.lines[: len(shard.lines) - cut]
        excess -= cut
    if skipped:
        log.warning("%s/%s: skipped %d unreadable samples: %s", shard_dir, split,
                    sum(skipped.values()), dict(skipped))
    return samples
