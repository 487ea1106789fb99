"""`tricolor-shards build`: videos -> shuffled WebDataset shards of frame triplets.

Two passes, so that samples can be written in a globally shuffled order (DALI's shuffle
buffer only mixes samples that are near each other in a shard) without holding every frame
in memory:

1. spool (`shards.spool`): decode each video (in parallel with --workers), resize, detect
   scene cuts, and JPEG-encode every frame once into a spool file under
   DIR/.spool-*.partial/;
2. write (`shards.write`): form the triplets (t-1, t, t+1) that do not cross a cut, split
   train/val by whole scenes (or whole videos), shuffle, and write shards that reference the
   spooled JPEGs.

Every file is written under a `.partial` name and renamed when complete; the manifest is
written last, so a directory with a manifest is always whole. A whole build then scans its
shards once as the loader would and writes `good-samples.json` beside the manifest, which
loaders read instead of scanning every shard at every start (`trainer.data.samples`).

Rebuilding (`--overwrite`) never takes the old data set apart before the new one is whole;
what it may delete, and when, is `shards.retire`'s.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from shards.atomic import PARTIAL_SUFFIX, fsync_dir, write_json_partial
from shards.manifest import MANIFEST, ManifestError, manifest_name
from shards.params import BuildParams
from shards.retire import (
    files_of_build,
    find_old,
    is_published,
    remove_quietly,
    retire,
    write_journal,
)
from shards.scan import GOOD_SAMPLES, write_good_samples
from shards.spool import spool_all
from shards.write import write_all


@dataclass
class BuildResult:
    manifest: dict
    skipped: list[dict]


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
    "skipped" list. What `overwrite` replaces, and when: `shards.retire`."""
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
        spooled, skipped = spool_all(videos, spool_dir, params, workers, log, skipped)
        manifest = write_all(spooled, skipped, out_dir, tag, params, log)
        partial = write_json_partial(manifest_path, manifest)
        published = os.stat(partial).st_ino
        os.replace(partial, manifest_path)  # the one step that switches to the new data set
    except BaseException as e:
        if not is_published(manifest_path, published):
            remove_quietly(files_of_build(out_dir, tag, manifest_path))
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


__all__ = ["BuildParams", "build", "MANIFEST"]
