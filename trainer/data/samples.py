"""Which samples of a shard directory a loader may read, and the DALI indexes that list them.

Before any loader starts, the shards of its split are scanned, so that all ranks read one
list of readable samples; the trainer scans on one process and hands the list to the others
(`trainer.data.select_samples_once`), a loader made without one scans for itself. Shard and
index paths come only from the manifest (`shards.manifest.shard_file`: plain names inside
the shard folder). Per shard:

- a missing, empty or unreadable shard (not a tar) is skipped with a warning and counts as
  the manifest's number of samples for it;
- its `.idx` must be a DALI index of this very tar: an unreadable one (a directory, no
  permission), a malformed one (bad header, wrong field
  count, non-integers, members listed past the end of a whole tar) or a stale one (the tar
  header 512 bytes before a listed member does not carry its name and size) is reported
  naming the index file, and the shard is re-indexed from the tar for this run, as when the
  index is missing; the manifest's samples a shard no longer holds count as "truncated
  tar" (or "missing samples" when the tar reads whole);
- a sample with a missing frame member, one that runs past the end of a truncated tar, a
  JPEG member without JPEG start/end markers, or (shards built with checksums) a frame whose
  CRC-32 differs from the one recorded in the sample's `json` member, or an unreadable
  `json` member, is skipped with a warning naming the shard and the key, and counted by
  reason. Shards without checksums still load; one warning says that corrupted JPEG data
  (markers intact) cannot be detected in them.

Checking the checksums reads and hashes every frame byte of the split on the scanning
process: about 0.75 s per GB of shards in the page cache, 1.3 s per GB from disk, on this
2-core machine (the scan without it: 0.2-1 s per GB). A shard whose checksums all matched
is remembered (`VerifiedCache`, keyed by path, size, mtime and index), so a restart hashes
only new or changed shards.

The scan runs once per data set, not at every start: `tricolor-shards build` and
`tricolor-shards verify` scan every shard as above (every checksum, no cache) and write its
result beside the manifest (`good-samples.json`, `write_good_samples`): per shard, the
readable samples' index lines and what was skipped, keyed by what identifies the files'
versions (size and mtime in ns of the tar and its `.idx`, the manifest's sha256 and sample
count, the members read). A loader reads that one file instead of opening the shards; a
shard whose files no longer match their record (changed, truncated, replaced, lost), or that
the index lacks, is scanned as above, with a warning naming it, and only that one. Without
the file every shard is scanned, as before. The result is the same list either way
(`SampleSet.fingerprint()`, also saved with the loader position). One process per job reads
it and hands the list to the others (`trainer.data.select_samples_once`).

The readable samples are trimmed to a multiple of the world size, so that every rank reads
the same number of samples (uneven step counts hang DDP collectives), and the survivors are
written as fresh `.idx` files in a private directory: DALI then never touches a bad sample,
because it only reads what the index lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import tarfile
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shards.atomic import write_text_atomic
from shards.flow import MEMBERS as FLOW_MEMBERS  # with --flow: t -> t-1, t -> t+1
from shards.manifest import load_manifest, shard_file
from shards.tario import INDEX_VERSION, read_index, split_member_name

log = logging.getLogger(__name__)

FRAME_MEMBERS = ("prev.jpg", "cur.jpg", "next.jpg")  # frames t-1, t, t+1
TAR_BLOCK = 512  # a tar header is one block, right before its member's data

GOOD_SAMPLES = "good-samples.json"  # the scan's result, beside manifest.json
GOOD_SAMPLES_FORMAT = "tricolor-good-samples/1"

Member = tuple[int, int, str]  # (offset of the data, size, member name in the tar)
Sample = dict[str, Member]  # extension (e.g. "cur.jpg") -> member


class NoSamplesError(ValueError):
    """The shard list holds no readable sample."""


@dataclass
class ShardSamples:
    tar: Path
    lines: list[str]  # one index line per readable sample (frame and flow members only)
    unchecked: int = 0  # readable samples whose json carries no CRC-32 (older builds)


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


# --- the index of one shard ---------------------------------------------------------------


def parse_index(text: str) -> list[Sample]:
    """The samples a wds2idx-format index lists; ValueError saying what is malformed."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        first = lines[0][:40] if lines else ""
        raise ValueError(f"header line {first!r}, expected '{INDEX_VERSION} <samples>'")
    samples: list[Sample] = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) % 4:
            raise ValueError(f"line {number} has {len(fields)} fields, expected 4 per member "
                             "(ext offset size name)")
        sample = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            if not (offset.isdigit() and size.isdigit()):
                raise ValueError(f"line {number}: offset {offset!r} or size {size!r} is not "
                                 "a non-negative integer")
            sample[ext] = (int(offset), int(size), name)
        samples.append(sample)
    if int(head[1]) != len(samples):
        raise ValueError(f"header says {head[1]} samples, {len(samples)} lines follow")
    return samples


def index_tar(tar: Path) -> tuple[list[Sample], str | None]:
    """Index `tar` from its headers, as wds2idx does; for a tar cut short, the samples before
    the cut and what went wrong (None when the whole tar was read)."""
    members: list[list[tuple[str, int, int, str]]] = []
    try:
        read_index(tar, members)
        error = None
    except (tarfile.TarError, OSError, EOFError) as e:
        error = str(e) or type(e).__name__
    return [{ext: (offset, size, name) for ext, offset, size, name in m} for m in members], error


def _header_holds(data: mmap.mmap, member: Member) -> bool:
    """Whether the tar header right before `member`'s data names it with its size."""
    offset, size, name = member
    if offset < TAR_BLOCK:
        return False
    header = data[offset - TAR_BLOCK : offset]
    stored = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:262] == b"ustar" and prefix:
        stored = f"{prefix}/{stored}"
    try:
        stored_size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return False
    # A long name (GNU or PAX) leaves only its first characters in the header itself.
    named = stored == name or (len(name) >= 100 and stored != "" and name.startswith(stored))
    return named and stored_size == size


def _index_problem(tar: Path, samples: list[Sample], data: mmap.mmap) -> str | None:
    """Why `samples` (read from the shard's index) do not describe `tar`, or None."""
    past_end = False
    for sample in samples:
        for member in sample.values():
            if member[0] + member[1] > len(data):
                past_end = True  # a truncated tar, or an index of a longer one
            elif not _header_holds(data, member):
                return (f"stale index: {tar.name} holds no member {member[2]!r} of "
                        f"{member[1]} bytes at offset {member[0]} (an index of another tar?)")
    if past_end and index_tar(tar)[1] is None:
        return f"it lists members past the end of {tar.name}, which is a whole tar"
    return None


def _listed_samples(tar: Path, index: Path, data: mmap.mmap) -> tuple[list[Sample], str | None]:
    """The samples of `tar` from its index, or from the tar itself where the index is
    missing or does not describe it; plus, when the tar is cut short, what went wrong."""
    if not index.exists():
        log.warning("%s: no index beside the shard; indexing it now", tar)
        return index_tar(tar)
    try:
        samples = parse_index(index.read_text())
        problem = _index_problem(tar, samples, data)
    except ValueError as e:  # UnicodeDecodeError included
        problem = f"malformed index ({e})"
    except OSError as e:  # a directory, no permission: the tar itself still says it all
        problem = f"unreadable index ({e.strerror or e})"
    if problem is None:
        return samples, None
    log.warning("%s: %s; re-indexing %s from the tar for this run (rebuild the shards to "
                "replace the file)", index, problem, tar.name)
    return index_tar(tar)


# --- the samples of one shard -------------------------------------------------------------


class VerifiedCache:
    """Shards whose frames all matched their CRC-32 at an earlier start, so that a restart
    (a requeued job) does not read and hash every frame again: one empty file per shard in
    `$XDG_CACHE_HOME/tricolor/verified-shards` (default `~/.cache/...`), named by a hash of
    the shard's resolved path, size, mtime (ns) and the samples its index lists. A shard
    damaged in place without a change of size or mtime is therefore not re-checked: delete
    the folder to check everything again. The cache is optional: where it cannot be
    written, every start checks every frame."""

    @staticmethod
    def directory() -> Path:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "tricolor" / "verified-shards"

    @classmethod
    def marker(cls, tar: Path, samples: list[Sample]) -> Path | None:
        try:
            stat = tar.stat()
            h = hashlib.sha256(f"{tar.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            h.update(json.dumps(samples, sort_keys=True).encode())
            return cls.directory() / h.hexdigest()
        except (OSError, RuntimeError):  # no home directory, or a path that will not resolve
            return None

    @staticmethod
    def remember(marker: Path) -> None:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            partial = marker.with_name(f"{marker.name}.{os.getpid()}.partial")
            partial.touch()
            os.replace(partial, marker)  # ranks scanning the same shard write the same file
        except OSError as e:
            log.debug("cannot remember verified shard in %s (%s)", marker.parent, e)



def _checksum_problem(sample: Sample, data: mmap.mmap,
                      members: tuple[str, ...] = FRAME_MEMBERS) -> str | None:
    """A frame whose CRC-32 is not the recorded one, or an unreadable json member; "" when
    the sample records no checksums (built before they were)."""
    if "json" not in sample:
        return ""
    offset, size, _ = sample["json"]
    try:
        meta = json.loads(data[offset : offset + size])
    except ValueError as e:  # not JSON, or not UTF-8
        return f"checksum mismatch (json member unreadable: {e})"
    if not isinstance(meta, dict):
        return "checksum mismatch (json member is not an object)"
    if "crc32" not in meta:
        return ""
    recorded = meta["crc32"]
    for m in members:
        if not isinstance(recorded, dict) or not isinstance(recorded.get(m), int):
            return f"checksum mismatch (json member records no CRC-32 of {m})"
        offset, size, _ = sample[m]
        crc = zlib.crc32(data[offset : offset + size])
        if crc != recorded[m]:
            return f"checksum mismatch ({m}: CRC-32 {crc:08x}, recorded {recorded[m]:08x})"
    return None


def _jpeg_ok(data: mmap.mmap, offset: int, size: int) -> bool:
    # JPEG starts with SOI (FFD8) and ends with EOI (FFD9), possibly followed by a few
    # padding bytes. Missing markers mean a cut or foreign file: the decoder would fail.
    tail = data[max(offset, offset + size - 64) : offset + size]
    return size > 4 and data[offset : offset + 2] == b"\xff\xd8" and b"\xff\xd9" in tail


def _png_ok(data: mmap.mmap, offset: int, size: int) -> bool:
    return size > 8 and data[offset : offset + 8] == b"\x89PNG\r\n\x1a\n"


def _sample_problem(sample: Sample, data: mmap.mmap, verified: bool,
                    members: tuple[str, ...] = FRAME_MEMBERS) -> str | None:
    """Why this sample cannot be trained on ("" when it can but records no checksums).
    `verified`: its shard's checksums all matched at an earlier start (see `VerifiedCache`)."""
    missing = [m for m in members if m not in sample]
    if missing:
        return f"missing component {', '.join(missing)}"
    if any(o + s > len(data) for o, s, _ in sample.values()):
        return "truncated tar (member runs past the end of the file)"
    bad = [m for m in FRAME_MEMBERS if not _jpeg_ok(data, *sample[m][:2])]
    if bad:
        return f"undecodable JPEG ({', '.join(bad)}: no JPEG markers)"
    bad = [m for m in members if m in FLOW_MEMBERS and not _png_ok(data, *sample[m][:2])]
    if bad:
        return f"undecodable PNG ({', '.join(bad)}: no PNG signature)"
    return None if verified else _checksum_problem(sample, data, members)


def _skip_shard(tar: Path, why: str, reason: str, expected: int | None, skipped: Counter):
    count = 1 if expected is None else expected
    log.warning("%s: %s; its %d samples skipped", tar, why, count)
    skipped[reason] += count
    return ShardSamples(tar, [])


def scan_shard(tar: Path, skipped: Counter, index: Path | None = None,
               expected: int | None = None,
               members: tuple[str, ...] = FRAME_MEMBERS,
               use_cache: bool = True) -> ShardSamples:
    """The readable samples of one shard; each unreadable one is logged and counted.
    `expected`: the manifest's sample count of the shard (None: unknown, then a lost
    shard counts as one). `use_cache=False`: check every checksum, whatever `VerifiedCache`
    remembers, and remember nothing (what `write_good_samples` records)."""
    index = index or tar.with_suffix(".idx")
    if not tar.exists():
        return _skip_shard(tar, "shard listed in the manifest is missing", "missing shard",
                           expected, skipped)
    try:
        f = open(tar, "rb")
    except OSError as e:
        return _skip_shard(tar, f"cannot open ({e})", "unreadable shard", expected, skipped)
    with f:
        if f.seek(0, 2) == 0:
            return _skip_shard(tar, "empty shard", "empty shard", expected, skipped)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan_samples(tar, index, data, expected, skipped, members, use_cache)


def _scan_samples(tar, index, data, expected, skipped, members, use_cache) -> ShardSamples:
    samples, cut = _listed_samples(tar, index, data)
    if not samples:
        return _skip_shard(tar, f"cannot index this shard ({cut or 'no samples'})",
                           "unreadable shard", expected, skipped)
    if expected is not None and len(samples) < expected:
        lost = expected - len(samples)
        log.warning("%s: holds %d of the manifest's %d samples (%s); %d skipped", tar,
                    len(samples), expected, f"tar cut short: {cut}" if cut else "no more in "
                    "the tar", lost)
        skipped["truncated tar" if cut else "missing samples"] += lost
    shard = ShardSamples(tar, [])
    marker = VerifiedCache.marker(tar, samples) if use_cache else None
    verified = marker is not None and marker.exists()
    mismatches = 0
    for i, sample in enumerate(samples):
        key = split_member_name(next(iter(sample.values()))[2])[0]
        reason = _sample_problem(sample, data, verified, members)
        mismatches += bool(reason) and reason.startswith("checksum mismatch")
        if reason and cut and i == len(samples) - 1 and reason.startswith("missing component"):
            reason = f"truncated tar (the tar ends inside this sample: {cut})"
        if reason:
            log.warning("%s: sample %s: %s; skipped", tar, key, reason)
            skipped[reason.split(" (")[0]] += 1
            continue
        shard.unchecked += reason == ""
        shard.lines.append(" ".join(f"{m} {sample[m][0]} {sample[m][1]} {sample[m][2]}"
                                    for m in members))
    if marker is not None and not verified and not mismatches and not shard.unchecked:
        VerifiedCache.remember(marker)
    return shard


def _members(manifest: dict) -> tuple[str, ...]:
    # built with --flow: the flow members are read too
    return FRAME_MEMBERS + (FLOW_MEMBERS if "flow" in manifest else ())


def _file_version(path: Path) -> list[int] | None:
    """What identifies this version of a file: [size, mtime in ns]; None when it is not there."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _shard_key(entry: dict, members: tuple[str, ...], tar: Path, index: Path) -> dict:
    """What a shard's record in `good-samples.json` holds for: the manifest's entry and the
    versions of its files (`tar`, `index`: the entry's paths, `shard_file`). Taken before the
    shard is read: a change during the scan makes the record stale, never wrong."""
    return {
        "tar": entry["tar"],
        "index": entry["index"],
        "sha256": entry["sha256"],
        "samples": entry["samples"],
        "members": list(members),
        "tar_version": _file_version(tar),
        "index_version": _file_version(index),
    }


def write_good_samples(shard_dir: Path) -> Path:
    """Scan every shard of every split of `shard_dir` (every checksum, no cache) and write the
    result to `shard_dir/good-samples.json` in one atomic step; return its path. Run by
    `tricolor-shards build`, `merge` and `verify`; loaders read it instead of scanning."""
    manifest = load_manifest(shard_dir)
    members = _members(manifest)
    splits: dict[str, list[dict]] = {}
    for split, info in manifest["splits"].items():
        records = splits[split] = []
        for entry in info["shards"]:
            tar, index = shard_file(shard_dir, entry["tar"]), shard_file(shard_dir, entry["index"])
            key = _shard_key(entry, members, tar, index)
            skipped: Counter = Counter()
            found = scan_shard(tar, skipped, index, entry["samples"], members, use_cache=False)
            records.append({**key, "lines": found.lines, "unchecked": found.unchecked,
                            "skipped": dict(skipped)})
    path = shard_dir / GOOD_SAMPLES
    # compact: at 1e6 samples this is ~200 MB of index lines, read once per start
    write_text_atomic(path, json.dumps({"format": GOOD_SAMPLES_FORMAT, "splits": splits},
                                       separators=(",", ":")) + "\n")
    return path


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
    members = _members(manifest)
    records = read_good_samples(shard_dir, split)
    shards, rescanned = [], []
    for entry in info["shards"]:
        tar, index = shard_file(shard_dir, entry["tar"]), shard_file(shard_dir, entry["index"])
        record = None if records is None else records.get(entry["tar"])
        if records is not None and _record_holds(record, _shard_key(entry, members, tar, index)):
            shards.append(_from_record(tar, record, skipped))
            continue
        if records is not None:
            rescanned.append(entry["tar"])
        shards.append(scan_shard(tar, skipped, index, entry.get("samples"), members))
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
