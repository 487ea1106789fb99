"""WebDataset tar shards and the DALI index (`.idx`) that goes beside each one.

A shard is a plain POSIX tar whose members are grouped into samples by key: every member of
sample `abc` is named `abc.<ext>` and the members of a sample are consecutive. DALI's
`fn.readers.webdataset` needs an index of byte offsets per member; we write the same
format as DALI's `wds2idx` tool (version line, then one line per sample listing
`ext offset size name` for each member), computed from the tar we just wrote.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from shards.atomic import PARTIAL_SUFFIX, publish

INDEX_VERSION = "v1.2"  # the version string DALI's wds2idx writes (DALI 1.x and 2.x)


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/key.prev.jpg` -> (`dir/key`, `prev.jpg`): the key ends at the first dot of the
    basename, as in webdataset and DALI. Keys therefore must not contain dots."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_index(tar_path: Path, samples: list[list[tuple[str, int, int, str]]]) -> None:
    """Append to `samples`, as the tar is read, each sample's members (ext, data offset, size,
    name) in order, regular files only, as wds2idx indexes them. Errors of a tar cut short
    propagate; what was read before the cut stays in `samples` (the loader's scan keeps it)."""
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/"):  # hidden files, as wds2idx skips them
                continue
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, member.offset_data, member.size, member.name))


def index_lines(tar_path: Path) -> list[str]:
    """The lines of a wds2idx-compatible index for `tar_path` (regular files only)."""
    samples: list[list[tuple[str, int, int, str]]] = []
    read_index(tar_path, samples)
    if not samples:
        raise ValueError(f"{tar_path}: no samples in this tar, cannot index it")
    return [f"{INDEX_VERSION} {len(samples)}"] + [
        " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample)
        for sample in samples]


def index_text(tar_path: Path) -> str:
    return "\n".join(index_lines(tar_path)) + "\n"


class ShardWriter:
    """Writes one shard to `<name>.tar.partial`; `close()` publishes the tar and its index.

    Until `close()` returns, nothing under the final names exists, so an interrupted write
    can never be mistaken for a complete shard.
    """

    def __init__(self, tar_path: Path):
        self.tar_path = tar_path
        self.index_path = tar_path.with_suffix(".idx")
        self._partial = tar_path.with_name(tar_path.name + PARTIAL_SUFFIX)
        self._tar = tarfile.open(self._partial, "w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; `members` maps extension (e.g. `cur.jpg`) to its bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0  # deterministic bytes: the same input gives the same shard hash
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> dict:
        """Publish tar and index; return the manifest entry of this shard."""
        self._tar.close()
        index_partial = self.index_path.with_name(self.index_path.name + PARTIAL_SUFFIX)
        index_partial.write_text(index_text(self._partial))
        publish(index_partial, self.index_path)
        publish(self._partial, self.tar_path)
        return {
            "tar": self.tar_path.name,
            "index": self.index_path.name,
            "samples": self.samples,
            "bytes": self.tar_path.stat().st_size,  # what the data set costs on disk
            "sha256": sha256_file(self.tar_path),
        }

    def abort(self) -> None:
        """Remove the partial files. Runs while an error is already raised (a full disk
        fails the tar's final flush too): never raise a second one."""
        try:
            self._tar.close()
        except OSError:
            pass
        index_partial = self.index_path.with_name(self.index_path.name + PARTIAL_SUFFIX)
        for path in (self._partial, index_partial):
            path.unlink(missing_ok=True)
