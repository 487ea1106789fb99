"""`tricolor-shards verify`: re-read a shard directory and list everything that is wrong."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from shards.atomic import PARTIAL_SUFFIX
from shards.manifest import ManifestError, load_manifest, tool_file_slice
from shards.tario import index_text, sha256_file, split_member_name

SAMPLE_FIELDS = ("source", "frame", "fps", "scene", "width", "height")


def verify(out_dir: Path) -> list[str]:
    """All problems found in `out_dir`, each naming its file; an empty list means sound."""
    if not out_dir.is_dir():
        return [f"{out_dir}: not a folder (verify takes the folder that holds manifest.json)"]
    try:
        manifest = load_manifest(out_dir)
    except ManifestError as e:
        return [str(e)]
    problems: list[str] = []
    expected_members = set(manifest["members"])
    listed: set[str] = set()
    keys_seen: dict[str, str] = {}
    for split, info in manifest["splits"].items():
        sizes = {tuple(s) for s in info["frame_sizes"]}
        counted = 0
        for shard in tqdm(info["shards"], desc=f"verify {split}", unit="shard"):
            listed.update((shard["tar"], shard["index"]))
            found = _verify_shard(out_dir, shard, expected_members, sizes, keys_seen, problems)
            counted += found
        if counted != info["samples"]:
            problems.append(
                f"{out_dir / 'manifest.json'}: split {split!r} lists {info['samples']} samples, "
                f"its shards hold {counted}"
            )
    for path in sorted(out_dir.iterdir()):
        if tool_file_slice(path.name) is None:
            continue  # not a name this tool writes: someone else's file
        if path.name.endswith(PARTIAL_SUFFIX) or path.name.startswith(".spool"):
            problems.append(f"{path}: leftover of an interrupted build (rebuild with --overwrite)")
        elif path.name not in listed:
            problems.append(f"{path}: not listed in the manifest (left by an interrupted or "
                            "replaced build; `build --overwrite` removes it)")
    return problems


def _verify_shard(out_dir, shard, expected_members, sizes, keys_seen, problems) -> int:
    """Check one shard; append problems; return the number of samples it holds."""
    tar_path, index_path = out_dir / shard["tar"], out_dir / shard["index"]
    if not tar_path.exists():
        problems.append(f"{tar_path}: missing")
        return 0
    if sha256_file(tar_path) != shard["sha256"]:
        problems.append(f"{tar_path}: sha256 differs from the manifest (modified or truncated)")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                key, ext = split_member_name(member.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{tar_path}: unreadable tar ({e})")
        return len(samples)
    if not index_path.exists():
        problems.append(f"{index_path}: missing index")
    elif index_path.read_text() != index_text(tar_path):
        problems.append(f"{index_path}: does not match the tar (rebuild the index)")
    if len(samples) != shard["samples"]:
        problems.append(
            f"{tar_path}: manifest says {shard['samples']} samples, the tar holds {len(samples)}"
        )
    for key, members in samples.items():
        where = f"{tar_path}: sample {key!r}"
        if key in keys_seen:
            problems.append(f"{where}: duplicate key, also in {keys_seen[key]}")
        keys_seen[key] = tar_path.name
        if set(members) != expected_members:
            problems.append(
                f"{where}: members {sorted(members)}, expected {sorted(expected_members)}"
            )
            continue
        problems += _verify_sample(where, members, sizes)
    return len(samples)


def _verify_sample(where: str, members: dict[str, bytes], sizes: set) -> list[str]:
    try:
        meta = json.loads(members["json"])
        size = (meta["width"], meta["height"])
        missing = [f for f in SAMPLE_FIELDS if f not in meta]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{where}.json: unreadable metadata ({e})"]
    if missing:
        return [f"{where}.json: missing fields {missing}"]
    problems = _crc_problems(where, members, meta.get("crc32"))
    for ext, data in members.items():
        kind = {".jpg": "JPEG", ".png": "PNG"}.get(Path(ext).suffix)  # frames; stored flow
        if kind is None:
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes every pixel: a truncated image fails here
                got = image.size
        except OSError as e:
            problems.append(f"{where}.{ext}: not a decodable {kind} ({e})")
            continue
        if got != size or size not in sizes:
            problems.append(f"{where}.{ext}: size {got}, metadata says {size}, manifest {sizes}")
    return problems


def _crc_problems(where: str, members: dict[str, bytes], crc: object) -> list[str]:
    """Compare the CRC-32 the build recorded per member (absent in shards built before it
    was recorded) with the bytes read: damaged JPEG data can decode without error."""
    if crc is None:
        return []
    if not isinstance(crc, dict) or not set(crc) <= set(members) - {"json"}:
        return [f"{where}.json: malformed crc32 field {crc!r}"]
    problems = []
    for ext, value in crc.items():
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{where}.json: malformed crc32 value {value!r} for {ext}")
        elif zlib.crc32(members[ext]) != value:
            problems.append(f"{where}.{ext}: damaged data (crc32 {zlib.crc32(members[ext]):08x}, "
                            f"the build recorded {value:08x})")
    return problems
