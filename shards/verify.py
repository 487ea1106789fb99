"""`tricolor-shards verify`: re-read a shard directory and list everything that is wrong.

Each sample is judged by the loaders' own scan (`shards.scan.scan_shard`, which runs
`shards.check.sample_problem`), here with every checksum and every image decoded; its result
is what `verify` writes to `good-samples.json`, so the index leaves out exactly the samples
named here. Around it, what concerns whole files: the manifest's sha256 and sample counts,
the `.idx` beside each tar, keys repeated across shards, and files no manifest lists.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from tqdm import tqdm

from shards.manifest import ManifestError, load_manifest, tool_file_slice
from shards.retire import journal_files
from shards.scan import members_of, quiet_scan, shard_record
from shards.tario import index_text, sha256_file, split_member_name


def verify(out_dir: Path, records: dict[str, list[dict]] | None = None) -> list[str]:
    """All problems found in `out_dir`, each naming its file; an empty list means sound.
    `records`: filled with each split's good-samples records (`write_good_samples`)."""
    if not out_dir.is_dir():
        return [f"{out_dir}: not a folder (verify takes the folder that holds manifest.json)"]
    try:
        manifest = load_manifest(out_dir)
    except ManifestError as e:
        return [str(e)]
    problems: list[str] = []
    members = members_of(manifest)
    listed: set[str] = set()
    keys_seen: dict[str, str] = {}
    for split, info in manifest["splits"].items():
        sizes = {tuple(s) for s in info["frame_sizes"]}
        split_records = [] if records is None else records.setdefault(split, [])
        counted = 0
        for shard in tqdm(info["shards"], desc=f"verify {split}", unit="shard"):
            listed.update((shard["tar"], shard["index"]))
            counted += _verify_shard(out_dir, shard, members, sizes, keys_seen, problems,
                                     split_records)
        if counted != info["samples"]:
            problems.append(
                f"{out_dir / 'manifest.json'}: split {split!r} lists {info['samples']} samples, "
                f"its shards hold {counted}"
            )
    problems += _unlisted_files(out_dir, listed)
    return problems


def _unlisted_files(out_dir: Path, listed: set[str]) -> list[str]:
    """Files with this tool's names that the manifest does not list, and whether a rebuild
    with --overwrite removes them (only what a record of this tool lists: `find_old`)."""
    removable = journal_files(out_dir)
    problems = []
    for path in sorted(out_dir.iterdir()):
        if tool_file_slice(path.name) is None or path.name in listed:
            continue  # not a name this tool writes (someone else's file), or the data set's
        if path in removable:
            problems.append(f"{path}: leftover of an interrupted build (`build --overwrite` "
                            "removes it)")
        else:
            problems.append(f"{path}: not listed in the manifest, and no build record names "
                            "it: `build --overwrite` keeps it; delete it yourself if it is "
                            "not yours")
    return problems


def _verify_shard(out_dir, shard, members, sizes, keys_seen, problems, records) -> int:
    """Check one shard; append problems and its good-samples record; return the number of
    samples it holds."""
    tar_path, index_path = out_dir / shard["tar"], out_dir / shard["index"]
    with quiet_scan():  # it logs each sample it leaves out: verify names each once, itself
        record, found = shard_record(out_dir, shard, members, sizes, decode=True)
    records.append(record)
    if not tar_path.exists():
        problems.append(f"{tar_path}: missing")
        return 0
    if sha256_file(tar_path) != shard["sha256"]:
        problems.append(f"{tar_path}: sha256 differs from the manifest (modified or truncated)")
    keys: list[str] = []
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                key = split_member_name(member.name)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{tar_path}: unreadable tar ({e})")
    if not index_path.exists():
        problems.append(f"{index_path}: missing index")
    else:
        try:
            current = index_path.read_text() == index_text(tar_path)
        except (tarfile.TarError, OSError, ValueError):
            current = False
        if not current:
            problems.append(f"{index_path}: does not match the tar (rebuild the index)")
    if len(set(keys)) != shard["samples"]:
        problems.append(
            f"{tar_path}: manifest says {shard['samples']} samples, the tar holds {len(set(keys))}"
        )
    for key in dict.fromkeys(keys):
        if key in keys_seen:
            problems.append(f"{tar_path}: sample {key!r}: duplicate key, also in {keys_seen[key]}")
        keys_seen[key] = tar_path.name
    problems += [f"{tar_path}: sample {key!r}: {reason}" for key, reason in found.bad.items()]
    return len(set(keys))
