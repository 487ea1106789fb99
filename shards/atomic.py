"""Write files so that a reader sees either nothing or the whole file, never a part of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Files still being written carry this suffix; readers and `verify` never take them for data.
PARTIAL_SUFFIX = ".partial"


def fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk, not only the file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: Path, final: Path) -> None:
    """Flush `partial` to disk and rename it to `final` in one atomic step."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    fsync_dir(final.parent)


def write_text_partial(path: Path, text: str) -> Path:
    """Write `text` to `<path>.partial`, flushed to disk, and return that path: the caller
    publishes it with `os.replace` when it chooses (see `shards.build.build`)."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(partial, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # failed (a full disk) or interrupted: no part of it left behind
        partial.unlink(missing_ok=True)
        raise
    return partial


def write_text_atomic(path: Path, text: str) -> None:
    partial = write_text_partial(path, text)
    try:
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_partial(path: Path, obj: object) -> Path:
    return write_text_partial(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
