"""Which samples of a shard directory a loader may read, and the DALI indexes that list them.

Before any loader starts, the shards of its split are scanned, so that all ranks read one
list of readable samples; the trainer scans on one process and hands the list to the others
(`trainer.data.select_samples_once`), a loader made without one scans for itself. What the
scan of one shard checks, and the good-samples index, live with the shard format
(`shards.scan`, `shards.check`).

The scan runs once per data set, not at every start: `tricolor-shards build` and
`tricolor-shards verify` write its result beside the manifest (`good-samples.json`). A
loader reads that one file instead of opening the shards; a shard whose files no longer
match their record (changed, truncated, replaced, lost), or that the index lacks, is
scanned, with a warning naming it, and only that one. Without the file every shard is
scanned. The result is the same list either way (`SampleSet.fingerprint()`, also saved
with the loader position). One process per job reads it and hands the list to the others
(`trainer.data.select_samples_once`).

The readable samples are trimmed to a multiple of the world size, so that every rank reads
the same number of samples (uneven step counts hang DDP collectives), and the survivors are
written as fresh `.idx` files in a private directory: DALI then never touches a sample the
scan left out, because it only reads what the index lists. Damage after the scan (the index
and the cache trust a shard whose size and mtime are unchanged) is met while reading: see
`trainer.data` for what each backend catches then, and `rescan`.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shards.check import FRAME_MEMBERS
from shards.flow import MEMBERS as FLOW_MEMBERS  # with --flow: t -> t-1, t -> t+1
from shards.manifest import load_manifest, shard_file
from shards.scan import (  # what the scan of one shard finds: re-exported for the loaders
    GOOD_SAMPLES,
    GOOD_SAMPLES_FORMAT,
    ShardSamples,
    VerifiedCache,
    frame_sizes,
    members_of,
    parse_index,
    quiet_scan,
    scan_shard,
    shard_key,
    shard_record,
)
from shards.tario import INDEX_VERSION, split_member_name

__all__ = ["FLOW_MEMBERS", "FRAME_MEMBERS", "GOOD_SAMPLES", "NoSamplesError", "SampleSet",
           "ShardSamples", "VerifiedCache", "parse_index", "scan_shard", "scan_split"]

log = logging.getLogger(__name__)


class NoSamplesError(ValueError):
    """The shard list holds no readable sample."""


def line_key(line: str) -> str:
    """The sample key of an index line (`ext offset size <key>.<ext> ...`)."""
    return split_member_name(line.split()[3])[0]


@dataclass
class SampleSet:
    shards: list[ShardSamples]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    trimmed: int = 0  # readable samples left out so every rank reads as many
    frame_sizes: list[tuple[int, int]] = field(default_factory=list)
    flow: bool = False  # the shards store optical flow (FLOW_MEMBERS), listed in the index

    def __len__(self) -> int:
        return sum(len(s.lines) for s in self.shards)

    def keys(self) -> list[str]:
        return [line_key(line) for s in self.shards for line in s.lines]

    def fingerprint(self) -> str:
        """Identifies this exact sample list: a saved loader position only applies to it."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.tar.name.encode())
            for line in s.lines:
                h.update(line.encode())
        return h.hexdigest()[:16]

    def replacing(self, bad: set[tuple[Path, str]]) -> SampleSet:
        """A copy in which each sample of `bad` (shard, key) reads another sample of its shard
        instead (the nearest sound one before it, else after it), so that every rank's slice
        of the list keeps its length; a shard with no sound sample left loses its lines."""
        shards = []
        for shard in self.shards:
            keys = [line_key(line) for line in shard.lines]
            good = [i for i, key in enumerate(keys) if (shard.tar, key) not in bad]
            lines = [] if not good else [
                line if (shard.tar, key) not in bad
                else shard.lines[good[max(bisect.bisect(good, i) - 1, 0)]]
                for i, (line, key) in enumerate(zip(shard.lines, keys))]
            shards.append(ShardSamples(shard.tar, lines, shard.unchecked))
        return dataclasses.replace(self, shards=shards)

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


def read_good_samples(shard_dir: Path, split: str) -> dict[str, dict] | None:
    """The records of `split` in `shard_dir/good-samples.json` by tar name; None (with a
    warning) when the file is missing or unreadable. Records are not checked against the
    files here: `_record_holds` does that per shard."""
    path = shard_dir / GOOD_SAMPLES
    if not path.exists():
        log.warning("%s: no good-samples index (%s): scanning every shard of the %s split "
                    "(`tricolor-shards verify %s` writes it)", shard_dir, GOOD_SAMPLES, split,
                    shard_dir)
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != GOOD_SAMPLES_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {GOOD_SAMPLES_FORMAT}")
        records = data["splits"].get(split, [])
        return {r["tar"]: r for r in records if isinstance(r, dict) and "tar" in r}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable good-samples index (%s): scanning every shard of the %s "
                    "split (`tricolor-shards verify %s` rewrites it)", path, e, split,
                    shard_dir)
        return None


def _record_holds(record: dict | None, key: dict) -> bool:
    """Whether a shard's record describes the shard's files as they are now."""
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in key.items()):
        return False
    lines, skipped = record.get("lines"), record.get("skipped")
    return (isinstance(lines, list) and all(isinstance(x, str) for x in lines)
            and isinstance(record.get("unchecked"), int) and isinstance(skipped, dict)
            and all(isinstance(n, int) for n in skipped.values()))


def _from_record(tar: Path, record: dict, skipped: Counter) -> ShardSamples:
    if record["skipped"]:
        log.warning("%s: %d samples skipped when the shards were indexed (%s); "
                    "`tricolor-shards verify` names them", tar, sum(record["skipped"].values()),
                    record["skipped"])
        skipped.update(record["skipped"])
    return ShardSamples(tar, list(record["lines"]), record["unchecked"])


def rescan(shard_dir: Path, split: str, samples: SampleSet,
           tars: set[Path] | None = None) -> dict[tuple[Path, str], str]:
    """The samples of `samples` that are damaged now, by (shard, key), with why: their shards
    (those of `tars`, or all) scanned again, every checksum, whatever the index and the
    cache say. For a reader that failed on a sample it could not check itself (DALI)."""
    manifest = load_manifest(shard_dir)
    info = manifest["splits"][split]
    reading = {s.tar: {line_key(line) for line in s.lines} for s in samples.shards}
    found = {}
    for entry in info["shards"]:
        tar = shard_file(shard_dir, entry["tar"])
        if tar not in reading or (tars is not None and tar not in tars):
            continue
        with quiet_scan():  # the caller names each sample
            _, shard = shard_record(shard_dir, entry, members_of(manifest), frame_sizes(info))
        found.update({(tar, key): why for key, why in shard.bad.items() if key in reading[tar]})
    return found


def evenly_spaced(samples: SampleSet, n: int) -> None:
    """Keep `n` samples of `samples` (in place), evenly spaced over its order: a fixed subset
    that depends only on the sample list, not on the world size or the run."""
    total = len(samples)
    if n <= 0 or n >= total:
        return
    keep = {i * total // n for i in range(n)}
    position = 0
    for shard in samples.shards:
        lines = shard.lines
        shard.lines = [line for i, line in enumerate(lines, start=position) if i in keep]
        position += len(lines)


def scan_split(shard_dir: Path, split: str, world_size: int = 1, subset: int = 0) -> SampleSet:
    """The readable samples of `split`, from `good-samples.json` where it matches the shards,
    by scanning the others; `subset` > 0: only that many of them, evenly spaced
    (`evenly_spaced`); trimmed to a multiple of `world_size`."""
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise NoSamplesError(f"{shard_dir}/manifest.json: no split {split!r}")
    info = manifest["splits"][split]
    skipped: Counter = Counter()
    flow = "flow" in manifest  # built with --flow: the flow members are read too
    members = members_of(manifest)
    records = read_good_samples(shard_dir, split)
    shards, rescanned = [], []
    for entry in info["shards"]:
        tar, index = shard_file(shard_dir, entry["tar"]), shard_file(shard_dir, entry["index"])
        record = None if records is None else records.get(entry["tar"])
        if records is not None and _record_holds(record, shard_key(entry, members, tar, index)):
            shards.append(_from_record(tar, record, skipped))
            continue
        if records is not None:
            rescanned.append(entry["tar"])
        shards.append(scan_shard(tar, skipped, index, entry.get("samples"), members,
                                 sizes=frame_sizes(info)))
    if rescanned:
        names = ", ".join(rescanned[:5]) + (f" and {len(rescanned) - 5} more"
                                            if len(rescanned) > 5 else "")
        log.warning("%s: %d of %d %s shards changed since %s was written (or it lacks them): "
                    "scanned them (%s); `tricolor-shards verify %s` rewrites the index",
                    shard_dir, len(rescanned), len(info["shards"]), split, GOOD_SAMPLES, names,
                    shard_dir)
    unchecked = [s for s in shards if s.unchecked]
    if unchecked:
        log.warning("%s/%s: %d samples in %d shards record no CRC-32 of their frames (built "
                    "before checksums): corrupted JPEG data in them cannot be detected; "
                    "rebuild the shards to get checksums", shard_dir, split,
                    sum(s.unchecked for s in unchecked), len(unchecked))
    samples = SampleSet(shards, skipped, frame_sizes=[tuple(s) for s in info["frame_sizes"]],
                        flow=flow)
    if subset > 0 and subset < len(samples):
        log.info("%s/%s: reading %d evenly spaced samples of %d", shard_dir, split, subset,
                 len(samples))
        evenly_spaced(samples, subset)
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
