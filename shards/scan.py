"""The samples of one shard that a loader may read, and the good-samples index that records
them for a whole data set: what `tricolor-shards build` and `verify` write, and what the
loaders' start-up scan (`trainer.data.samples`) runs on a shard the index does not hold.

Shard and index paths come only from the manifest (`shards.manifest.shard_file`: plain
names inside the shard folder). Per shard:

- a missing, empty or unreadable shard (not a tar) is skipped with a warning and counts as
  the manifest's number of samples for it;
- its `.idx` must be a DALI index of this very tar: an unreadable one (a directory, no
  permission), a malformed one (bad header, wrong field
  count, non-integers, members listed past the end of a whole tar) or a stale one (the tar
  header 512 bytes before a listed member does not carry its name and size) is reported
  naming the index file, and the shard is re-indexed from the tar for this run, as when the
  index is missing; the manifest's samples a shard no longer holds count as "truncated
  tar" (or "missing samples" when the tar reads whole);
- a sample that runs past the end of a truncated tar, or that fails the check `verify` runs
  too (`shards.check.sample_problem`: the members expected, each image's format by its
  signature and its size by its header against the sample's `json` member and the
  manifest, and, in shards built with checksums, each member's CRC-32 against the one the
  json records), is skipped with a warning naming the shard and the key, and counted by
  reason (`ShardSamples.bad` names them).

Checking the checksums reads and hashes every frame byte of the split on the scanning
process: about 0.75 s per GB of shards in the page cache, 1.3 s per GB from disk, on this
2-core machine (the scan without it: 0.2-1 s per GB). A shard whose checksums all matched
is remembered (`VerifiedCache`, keyed by path, size, mtime and index), so a restart hashes
only new or changed shards; a scan that finds one of them damaged forgets it.

`tricolor-shards build` and `tricolor-shards verify` scan every shard (every checksum, no
cache; `verify` also decodes every image) and write the result beside the manifest
(`good-samples.json`, `write_good_samples`; what `verify` names is what it leaves out): per
shard, the readable samples' index lines and what was skipped, keyed by what identifies the
files' versions (size and mtime in ns of the tar and its `.idx`, the manifest's sha256 and
sample count, the members read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shards.atomic import write_text_atomic
from shards.check import FRAME_MEMBERS, sample_problem
from shards.flow import MEMBERS as FLOW_MEMBERS  # with --flow: t -> t-1, t -> t+1
from shards.manifest import load_manifest, shard_file
from shards.tario import INDEX_VERSION, read_index, split_member_name

log = logging.getLogger(__name__)

TAR_BLOCK = 512  # a tar header is one block, right before its member's data

GOOD_SAMPLES = "good-samples.json"  # the scan's result, beside manifest.json
# /2: samples are also checked for their members' formats and sizes (an index of /1 may list
# a sample of the wrong size: loaders scan again instead of trusting it)
GOOD_SAMPLES_FORMAT = "tricolor-good-samples/2"

Member = tuple[int, int, str]  # (offset of the data, size, member name in the tar)
Sample = dict[str, Member]  # extension (e.g. "cur.jpg") -> member


@dataclass
class ShardSamples:
    tar: Path
    lines: list[str]  # one index line per readable sample (frame and flow members only)
    unchecked: int = 0  # readable samples whose json carries no CRC-32 (older builds)
    bad: dict[str, str] = field(default_factory=dict)  # key -> why it is left out


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

    @staticmethod
    def forget(marker: Path) -> None:
        try:
            marker.unlink(missing_ok=True)
        except OSError as e:
            log.debug("cannot forget verified shard %s (%s)", marker, e)


def _sample_problem(sample: Sample, data: mmap.mmap, verified: bool, members: tuple[str, ...],
                    sizes=None, decode: bool = False) -> str | None:
    """Why this sample cannot be trained on ("" when it can but records no checksums): the
    one check `verify` runs too (`shards.check.sample_problem`). `verified`: its shard's
    checksums all matched at an earlier start (see `VerifiedCache`)."""
    if any(o + s > len(data) for o, s, _ in sample.values()):
        return "truncated tar (member runs past the end of the file)"
    blobs = {ext: (data, offset, size) for ext, (offset, size, _) in sample.items()}
    return sample_problem(blobs, (*members, "json"), sizes, crc=not verified, decode=decode)


def _skip_shard(tar: Path, why: str, reason: str, expected: int | None, skipped: Counter):
    count = 1 if expected is None else expected
    log.warning("%s: %s; its %d samples skipped", tar, why, count)
    skipped[reason] += count
    return ShardSamples(tar, [])


def scan_shard(tar: Path, skipped: Counter, index: Path | None = None,
               expected: int | None = None,
               members: tuple[str, ...] = FRAME_MEMBERS,
               use_cache: bool = True, sizes=None, decode: bool = False) -> ShardSamples:
    """The readable samples of one shard; each unreadable one is logged and counted.
    `expected`: the manifest's sample count of the shard (None: unknown, then a lost
    shard counts as one). `use_cache=False`: check every checksum, whatever `VerifiedCache`
    remembers, and remember nothing (what `write_good_samples` records). `sizes`: the
    manifest's frame sizes of the split; `decode`: also decode every image (`verify`)."""
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
            return _scan_samples(tar, index, data, expected, skipped, members, use_cache,
                                 sizes, decode)


def _scan_samples(tar, index, data, expected, skipped, members, use_cache, sizes,
                  decode) -> ShardSamples:
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
    marker = VerifiedCache.marker(tar, samples)
    verified = use_cache and marker is not None and marker.exists()
    mismatches = 0
    for i, sample in enumerate(samples):
        key = split_member_name(next(iter(sample.values()))[2])[0]
        reason = _sample_problem(sample, data, verified, members, sizes, decode)
        mismatches += bool(reason) and reason.startswith("checksum mismatch")
        if reason and cut and i == len(samples) - 1 and reason.startswith("missing component"):
            reason = f"truncated tar (the tar ends inside this sample: {cut})"
        if reason:
            log.warning("%s: sample %s: %s; skipped", tar, key, reason)
            skipped[reason.split(" (")[0]] += 1
            shard.bad[key] = reason
            continue
        shard.unchecked += reason == ""
        shard.lines.append(" ".join(f"{m} {sample[m][0]} {sample[m][1]} {sample[m][2]}"
                                    for m in members))
    if marker is not None and mismatches:
        VerifiedCache.forget(marker)  # damaged since it was remembered (its mtime kept)
    elif use_cache and marker is not None and not verified and not shard.unchecked:
        VerifiedCache.remember(marker)
    return shard


def members_of(manifest: dict) -> tuple[str, ...]:
    # built with --flow: the flow members are read too
    return FRAME_MEMBERS + (FLOW_MEMBERS if "flow" in manifest else ())


def file_version(path: Path) -> list[int] | None:
    """What identifies this version of a file: [size, mtime in ns]; None when it is not there."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def shard_key(entry: dict, members: tuple[str, ...], tar: Path, index: Path) -> dict:
    """What a shard's record in `good-samples.json` holds for: the manifest's entry and the
    versions of its files (`tar`, `index`: the entry's paths, `shard_file`). Taken before the
    shard is read: a change during the scan makes the record stale, never wrong."""
    return {
        "tar": entry["tar"],
        "index": entry["index"],
        "sha256": entry["sha256"],
        "samples": entry["samples"],
        "members": list(members),
        "tar_version": file_version(tar),
        "index_version": file_version(index),
    }


def frame_sizes(info: dict) -> set[tuple[int, int]]:
    return {tuple(s) for s in info["frame_sizes"]}


def shard_record(shard_dir: Path, entry: dict, members: tuple[str, ...], sizes,
                 decode: bool = False) -> tuple[dict, ShardSamples]:
    """Scan one shard of the manifest (`entry`) with every checksum, no cache: its record in
    `good-samples.json`, and the scan's result (`ShardSamples.bad` names what it leaves out)."""
    tar, index = shard_file(shard_dir, entry["tar"]), shard_file(shard_dir, entry["index"])
    key = shard_key(entry, members, tar, index)
    skipped: Counter = Counter()
    found = scan_shard(tar, skipped, index, entry["samples"], members, use_cache=False,
                       sizes=sizes, decode=decode)
    record = {**key, "lines": found.lines, "unchecked": found.unchecked,
              "skipped": dict(skipped)}
    return record, found


def write_good_samples(shard_dir: Path, records: dict[str, list[dict]] | None = None) -> Path:
    """Scan every shard of every split of `shard_dir` (`shard_record`) and write the result to
    `shard_dir/good-samples.json` in one atomic step; return its path. Run by `tricolor-shards
    build` and `merge`; `verify` hands over the records of its own scan (`records`, which
    decodes every image too), so the index leaves out exactly the samples it names.
    Loaders read it instead of scanning."""
    if records is None:
        manifest = load_manifest(shard_dir)
        members = members_of(manifest)
        records = {split: [shard_record(shard_dir, entry, members, frame_sizes(info))[0]
                           for entry in info["shards"]]
                   for split, info in manifest["splits"].items()}
    path = shard_dir / GOOD_SAMPLES
    # compact: at 1e6 samples this is ~200 MB of index lines, read once per start
    write_text_atomic(path, json.dumps({"format": GOOD_SAMPLES_FORMAT, "splits": records},
                                       separators=(",", ":")) + "\n")
    return path


@contextlib.contextmanager
def quiet_scan():
    """No warning of the scan (each sample it leaves out): for callers that name them."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
