"""Reading a torch.distributed.checkpoint (DCP) without running code from it.

DCP itself unpickles twice on load (torch 2.13): `FileSystemReader.read_metadata` reads
`.metadata` with `pickle.load`, and `DefaultLoadPlanner.load_bytes` reads every non-tensor
entry (our optimizers' `param_groups`: lr, betas, eps, flags, parameter names) with
`torch.load(weights_only=False)`. Either runs arbitrary code from a crafted checkpoint.
Tensors are read with `torch.load(weights_only=True)` already.

Here `.metadata` goes through an unpickler that admits only DCP's metadata types, and the
non-tensor entries through `torch.load(weights_only=True)` (plain Python values and tensors);
anything else is refused with a CheckpointError naming the file. The metadata's file
references must be plain file names inside the checkpoint directory.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from trainer.checkpoint import CheckpointError

METADATA = ".metadata"

# Every global a DCP `.metadata` of torch 2.13 refers to (found by recording `find_class` on
# our own checkpoints), plus torch dtypes (checked in `find_class`). Each is a dataclass, an
# enum, a path, torch.Size or a lookup of a torch constant: building one runs no user code.
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # str -> torch.strided etc.
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_metadata(path: Path) -> Metadata:
    """`.metadata` of a DCP checkpoint, through the restricted unpickler, checked."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError...
        raise CheckpointError(f"{path}: refused ({type(e).__name__}: {e}); a checkpoint "
                              "may hold only DCP's metadata types") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not DCP checkpoint metadata "
                              f"({type(metadata).__name__})")
    for key, info in metadata.storage_data.items():
        if not isinstance(info, _StorageInfo) or not _plain_name(info.relative_path) \
                or info.transform_descriptors:
            raise CheckpointError(f"{path}: entry {getattr(key, 'fqn', key)!r} points at "
                                  f"{getattr(info, 'relative_path', info)!r}, not a plain "
                                  "file of the checkpoint directory")
    return metadata


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name \
        and "\\" not in name and "\0" not in name


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through `load_metadata`. `read_metadata` takes
    no keyword arguments on purpose: DCP then never falls back to per-rank metadata files."""

    def read_metadata(self) -> Metadata:  # type: ignore[override]
        metadata = load_metadata(Path(self.path) / METADATA)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor entries load with `weights_only=True`."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            info = self.metadata.storage_data[read_item.storage_index]
            lines = str(e).strip().splitlines() or [type(e).__name__]
            # torch's weights_only message names the refused global on one of its lines
            reason = next((x for x in lines[1:] if "global" in x.lower()), lines[0])
            raise CheckpointError(
                f"{self.directory / info.relative_path}: entry {fqn!r} refused ({reason}); "
                "a checkpoint may hold only tensors and plain Python values") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
