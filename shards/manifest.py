"""`manifest.json`: what a shard directory holds, and merging the manifests of sliced builds."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

from shards.atomic import write_json_atomic

FORMAT = "tricolor-shards/1"
MANIFEST = "manifest.json"
SLICE_MANIFEST = re.compile(r"^manifest-s(\d+)of(\d+)\.json$")
# The names this tool gives what it writes, with the slice (`s0of8`) as group 1 when sliced:
# shards (`train-[sKofN-][<build id>-]000000.tar`, with their `.idx`; names without a build id
# are from earlier versions), their `.partial` forms, manifests being written, spool folders,
# build records.
_TOOL_NAMES = (
    re.compile(r"^(?:train|val)-(?:(s\d+of\d+)-)?(?:[0-9a-f]{8}-)?\d{6}\.(?:tar|idx)(?:\.partial)?$"),
    re.compile(r"^manifest(?:-(s\d+of\d+))?\.json\.partial$"),
    # spool folders: `.spool-[sKofN-]<build id>.partial`, earlier `.spool-{all,sKofN}-partial`
    re.compile(r"^\.spool-(?:all-partial|(?:(s\d+of\d+)-)?(?:[0-9a-f]{8}\.)?partial)$"),
    # a build's record of the files it writes (`shards.retire.write_journal`)
    re.compile(r"^\.tricolor-build-(?:(s\d+of\d+)-)?[0-9a-f]{8}\.json(?:\.partial)?$"),
)


class ManifestError(Exception):
    """A manifest that is missing, unreadable or inconsistent; the message names the file."""


def tricolor_version() -> str:
    try:
        return importlib.metadata.version("tricolor")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def manifest_name(slice_: tuple[int, int] | None) -> str:
    return f"manifest-s{slice_[0]}of{slice_[1]}.json" if slice_ else MANIFEST


def tool_file_slice(name: str) -> str | None:
    """For a file name this tool writes (see `_TOOL_NAMES`): its slice (`s0of8`), or "" for
    a whole build. None for any other name: a file this tool never removes."""
    for pattern in _TOOL_NAMES:
        if match := pattern.match(name):
            return match[1] or ""
    return None


def shard_file(shard_dir: Path, name: object, where: Path | None = None) -> Path:
    """`shard_dir / name` for a file name listed in a manifest, refused (ManifestError naming
    the manifest) unless it is a plain name of a file inside `shard_dir`: a shared or
    downloaded shard folder must not make a reader open any other file (`../`, absolute
    paths, or a symlink that leads out of the folder)."""
    where = where or shard_dir / MANIFEST
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\0" in name):
        raise ManifestError(f"{where}: shard entry {name!r} is not a plain file name in "
                            f"{shard_dir}; refusing to read outside the shard folder")
    path = shard_dir / name
    if path.is_symlink():
        try:
            target = path.resolve()
        except (RuntimeError, OSError):  # a symlink loop (Python 3.11 raises RuntimeError)
            raise ManifestError(f"{where}: {path} is a symlink that leads nowhere") from None
        if not target.is_relative_to(shard_dir.resolve()):
            raise ManifestError(f"{where}: {path} is a symlink to {target}, outside "
                                f"{shard_dir}; refusing to read outside the shard folder")
    return path


# The keys every reader relies on, with their types: a manifest without them is refused by
# name instead of failing later with a KeyError.
_KEYS = {"params": dict, "members": list, "splits": dict, "sources": list, "skipped": list}
_SPLIT_KEYS = {"samples": int, "frame_sizes": list, "sources": list, "scenes": int,
               "shards": list}
_SHARD_KEYS = {"tar": str, "index": str, "samples": int, "sha256": str}


def _missing(obj: object, keys: dict, what: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{what} is {type(obj).__name__}, expected an object"
    for key, kind in keys.items():
        if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
            got = "missing" if key not in obj else type(obj[key]).__name__
            return f"{what}: key {key!r} {got}, expected {kind.__name__}"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_size(value: object) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(_is_count(v) and v > 0 for v in value))


def _value_problems(manifest: dict):
    """Values of the right container type but the wrong contents."""
    if not all(isinstance(m, str) for m in manifest["members"]):
        yield "key 'members': expected a list of member names (strings)"
    for split, info in manifest["splits"].items():
        if not _is_count(info["samples"]):
            yield f"split {split!r}: key 'samples' is {info['samples']!r}, expected a count >= 0"
        bad = next((s for s in info["frame_sizes"] if not _is_size(s)), None)
        if bad is not None:
            yield (f"split {split!r}: frame_sizes entry {bad!r}, expected a list of "
                   "two positive integers (a frame size)")
        for i, shard in enumerate(info["shards"]):
            if not _is_count(shard["samples"]):
                yield (f"split {split!r} shard {i}: key 'samples' is {shard['samples']!r}, "
                       "expected a count >= 0")


def _field_problems(manifest: dict):
    if problem := _missing(manifest, _KEYS, "manifest"):
        yield problem
        return
    for split, info in manifest["splits"].items():
        if problem := _missing(info, _SPLIT_KEYS, f"split {split!r}"):
            yield problem
            return
        for i, shard in enumerate(info["shards"]):
            if problem := _missing(shard, _SHARD_KEYS, f"split {split!r} shard {i}"):
                yield problem
                return
    yield from _value_problems(manifest)


def _check_shard_names(manifest: dict, shard_dir: Path, where: Path) -> None:
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            for key in ("tar", "index"):
                shard_file(shard_dir, shard[key], where)


def load_manifest(path: Path) -> dict:
    """Read a manifest (a file, or the directory holding `manifest.json`). It must hold every
    key readers use, and every shard file it lists must be a plain name inside its folder
    (see `shard_file`); anything else raises ManifestError naming the file."""
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise ManifestError(f"{path}: no manifest (not built, still building, or not merged)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # bad JSON or UTF-8, or not a readable file
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a tricolor shard manifest (expected format {FORMAT})")
    if problem := next(_field_problems(manifest), None):
        raise ManifestError(f"{path}: {problem}")
    _check_shard_names(manifest, path.parent, path)
    return manifest


def _unique(items: list[dict]) -> list[dict]:
    seen: set[str] = set()
    unique = []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def merge(out_dir: Path) -> dict:
    """Combine the `manifest-sKofN.json` of every slice K of a sliced build into
    `manifest.json`. Refuses when a slice is missing or the slices disagree on parameters."""
    parts: dict[int, dict] = {}
    totals = set()
    for path in sorted(out_dir.glob("manifest-s*of*.json")):
        match = SLICE_MANIFEST.match(path.name)
        if match:
            parts[int(match[1])] = load_manifest(path)
            totals.add(int(match[2]))
    if not parts:
        raise ManifestError(f"{out_dir}: no slice manifests (manifest-sKofN.json) to merge")
    if len(totals) != 1:
        raise ManifestError(f"{out_dir}: slice manifests from builds of different N: {totals}")
    (n,) = totals
    missing = sorted(set(range(n)) - set(parts))
    if missing:
        names = ", ".join(manifest_name((k, n)) for k in missing)
        raise ManifestError(f"{out_dir}: {len(missing)} of {n} slices not finished: {names}")

    def common(params: dict) -> dict:
        return {k: v for k, v in params.items() if k != "slice"}

    first = common(parts[0]["params"])
    for k, part in parts.items():
        if common(part["params"]) != first:
            raise ManifestError(
                f"{out_dir / manifest_name((k, n))}: built with parameters {part['params']}, "
                f"slice 0 with {parts[0]['params']}; rebuild the slices with the same flags"
            )
    merged = {
        "format": FORMAT,
        "tricolor_version": tricolor_version(),
        "params": {**first, "slice": None, "merged_slices": n},
        "members": parts[0]["members"],
        **({"flow": parts[0]["flow"]} if "flow" in parts[0] else {}),
        "splits": {},
        "sources": [s for k in sorted(parts) for s in parts[k]["sources"]],
        # Every slice names the inputs `find_videos` left out (each saw the same folders).
        "skipped": _unique([s for k in sorted(parts) for s in parts[k]["skipped"]]),
    }
    for split in parts[0]["splits"]:
        pieces = [parts[k]["splits"][split] for k in sorted(parts)]
        merged["splits"][split] = {
            "samples": sum(p["samples"] for p in pieces),
            "frame_sizes": sorted({tuple(s) for p in pieces for s in p["frame_sizes"]}),
            "sources": sorted({s for p in pieces for s in p["sources"]}),
            "scenes": sum(p["scenes"] for p in pieces),
            "shards": [s for p in pieces for s in p["shards"]],
        }
        merged["splits"][split]["frame_sizes"] = [
            list(s) for s in merged["splits"][split]["frame_sizes"]
        ]
    write_json_atomic(out_dir / MANIFEST, merged)
    return merged
