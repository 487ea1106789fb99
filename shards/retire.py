"""The safety of `tricolor-shards build --overwrite`: what a rebuild may delete, and when.

A rebuild never takes the old data set apart before the new one is whole: each build names
its shards with its own build id (`train-<id>-000000.tar`), writes them beside the old ones,
publishes its manifest with one atomic rename, and only then deletes the files the old
manifest(s) listed (`retire`). A crash, Ctrl-C or full disk at any point leaves the old or
the new data set whole. Only files that a manifest in the folder lists, or the record a build
writes before its first file (`.tricolor-build-<id>.json`: `write_journal`, for what a
killed build left), are ever removed: never a file for its name alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import PARTIAL_SUFFIX, fsync_dir, write_json_atomic
from shards.manifest import (
    MANIFEST,
    SLICE_MANIFEST,
    ManifestError,
    load_manifest,
    manifest_name,
    tool_file_slice,
)
from shards.params import SPLITS


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


def is_published(manifest_path: Path, inode: int | None) -> bool:
    """Whether the rename that publishes the manifest happened (an interrupt can arrive
    right after it): then its shards are the data set and must stay."""
    try:
        return inode is not None and os.stat(manifest_path).st_ino == inode
    except OSError:
        return False


def files_of_build(out_dir: Path, tag: str, manifest_path: Path) -> list[Path]:
    """Every file of the build tagged `tag`, published or partial, and its manifest partial."""
    names = [p for p in out_dir.iterdir() if p.name.startswith((f"train-{tag}", f"val-{tag}"))]
    return names + [manifest_path.with_name(manifest_path.name + PARTIAL_SUFFIX)]
