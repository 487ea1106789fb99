"""Damaged samples on real shards (built by `tricolor-shards build`, then damaged on disk):
what `verify` names is what the index leaves out; damage after indexing is skipped and
counted while read, or stops the run with one line; `build --overwrite` removes only what a
tricolor manifest or build record lists."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data import BACKENDS, damaged_copy, data_cfg, overwrite, rewrite_shard, train_shards
from videos import scene_video

from shards.tario import sha256_file, split_member_name
from trainer.data import BadSamplesError, TripletLoader, dali_available
from trainer.data.samples import GOOD_SAMPLES, parse_index


def flow_loader(shards: Path, backend: str, *overrides: str) -> TripletLoader:
    """A training loader that reads the stored flow too (the temporal loss's)."""
    cfg = data_cfg(shards, f"data.backend={backend}", *overrides)
    return TripletLoader(cfg, "grey", "train", 0, 1, torch.device("cpu"), seed=3, flow=True)


def epoch_keys(loader: TripletLoader) -> list[str]:
    keys = [k for batch in loader for k in batch.keys]
    assert len(keys) == len(loader) * loader.cfg.batch_size  # every batch, full
    return keys


def first_sample(shards: Path, shard: int = 0, which: int = 0) -> tuple[Path, dict, str]:
    """(tar, its index entry {ext: (offset, size, name)}, key) of a train sample."""
    tar = shards / train_shards(shards)[shard]["tar"]
    sample = parse_index(tar.with_suffix(".idx").read_text())[which]
    return tar, sample, split_member_name(sample["cur.jpg"][2])[0]


def encoded(size: tuple[int, int], kind: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (128, 128, 255)).save(buf, format=kind)
    return buf.getvalue()


def replace_member(shards: Path, key: str, ext: str, data: bytes) -> Path:
    """Rewrite the shard holding `key` with `data` as its member `ext`, the json's CRC-32 of
    it and the manifest's sha256 of the tar updated: a sample built that way (by an older
    build, or rewritten by another tool), consistent in every checksum."""
    for entry in train_shards(shards):
        tar = shards / entry["tar"]
        with tarfile.open(tar) as t:
            if not any(split_member_name(n)[0] == key for n in t.getnames()):
                continue

        def edit(k, e, d):
            if k != key or e not in (ext, "json"):
                return d
            if e == ext:
                return data
            meta = json.loads(d)
            meta["crc32"][ext] = zlib.crc32(data)
            return json.dumps(meta).encode()

        rewrite_shard(tar, edit)
        manifest = json.loads((shards / "manifest.json").read_text())
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["tar"] == tar.name:
                    shard["sha256"] = sha256_file(tar)
        (shards / "manifest.json").write_text(json.dumps(manifest))
        return tar
    raise AssertionError(f"no sample {key}")


def damage_in_place(tar: Path, member: tuple[int, int, str]) -> None:
    """Flip 8 bytes in the middle of a member, the tar's size and mtime kept: the index and
    the verified-shards cache still hold for it."""
    offset, size, _ = member
    stat = tar.stat()
    middle = offset + size // 2
    with open(tar, "rb") as f:
        f.seek(middle)
        data = f.read(8)
    overwrite(tar, middle, bytes(b ^ 0x5A for b in data))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def run_verify(shards: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "verify", str(shards)],
                          capture_output=True, text=True)


def indexed_keys(shards: Path) -> set[str]:
    records = json.loads((shards / GOOD_SAMPLES).read_text())["splits"]["train"]
    return {split_member_name(line.split()[3])[0] for r in records for line in r["lines"]}


# --- what verify names, the index leaves out ------------------------------------------------

DAMAGE = {
    # a valid PNG, smaller than the crop: DALI's crop window and webdataset's stack failed on it
    "PNG of another size": (lambda: encoded((20, 20), "PNG"),
                            "wrong size (flow_next.png: 20x20, the json says 96x64)"),
    # decodes, but as lossy flow: verify said "ok" while the scan skipped it
    "JPEG in a flow slot": (lambda: encoded((96, 64), "JPEG"),
                            "undecodable PNG (flow_next.png: JPEG data, expected PNG)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_a_flow_member_the_loader_cannot_use_and_the_index_leaves_it_out(
        tmp_path, shards, damage):
    copy = damaged_copy(shards, tmp_path)
    _, _, key = first_sample(copy)
    data, reason = DAMAGE[damage]
    tar = replace_member(copy, key, "flow_next.png", data())
    result = run_verify(copy)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tar}: sample {key!r}: {reason}"], result.stderr
    assert "ok" not in result.stdout and "skipped" not in result.stderr
    assert key not in indexed_keys(copy)  # the index verify wrote leaves it out
    indexed = flow_loader(copy, "webdataset")
    (copy / GOOD_SAMPLES).unlink()
    scanned = flow_loader(copy, "webdataset")  # the loader's own scan: the same verdict
    assert indexed.samples.fingerprint() == scanned.samples.fingerprint()
    category = reason.split(" (")[0]
    assert indexed.skipped == scanned.skipped == {category: 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sample_verify_rejects_is_never_read(tmp_path, shards, backend):
    """The start-up scan used to pass a flow PNG of another size, which killed training
    several batches in: now the loader leaves it out and reads every epoch whole."""
    copy = damaged_copy(shards, tmp_path)
    _, _, key = first_sample(copy)
    replace_member(copy, key, "flow_next.png", encoded((20, 20), "PNG"))
    assert run_verify(copy).returncode == 1
    loader = flow_loader(copy, backend)
    assert loader.skipped == {"wrong size": 1}
    for _ in range(2):
        assert key not in epoch_keys(loader)


# --- damage after indexing: caught while read ---------------------------------------------

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="no DALI wheel")
# DALI's reader cannot check a CRC-32: its case of JPEG damage follows (not caught)
CAUGHT_WHILE_READ = [("webdataset", "cur.jpg"), ("webdataset", "flow_next.png"),
                     pytest.param("dali", "flow_next.png", marks=NEEDS_DALI)]


@pytest.mark.parametrize("backend, member", CAUGHT_WHILE_READ)
def test_bytes_damaged_in_place_after_indexing_are_skipped_and_counted_while_read(
        tmp_path, shards, backend, member, caplog):
    copy = damaged_copy(shards, tmp_path)
    flow_loader(copy, backend)  # the verified-shards cache remembers every shard too
    tar, sample, key = first_sample(copy)
    damage_in_place(tar, sample[member])
    with caplog.at_level(logging.WARNING):
        loader = flow_loader(copy, backend)
        assert loader.skipped == {}  # the index and the cache still hold: nothing at start
        seen = epoch_keys(loader) + epoch_keys(loader)
    assert key not in seen
    assert loader.skipped == {"checksum mismatch while reading": 1}
    [(where, reason)] = loader.bad.items()
    assert where == (str(tar), key) and reason.startswith(f"checksum mismatch ({member}: CRC-32")
    assert caplog.text.count(f"{tar}: sample {key}: checksum mismatch") == 1  # once, named
    assert run_verify(copy).returncode == 1  # and verify names it, whatever the index says
    assert key not in indexed_keys(copy)


@NEEDS_DALI
def test_in_place_jpeg_damage_is_what_dali_cannot_see_and_verify_finds(tmp_path, shards):
    """DALI reads the tar itself: JPEG data damaged in place (markers and size kept) decodes
    to wrong pixels without an error. Not caught while training on DALI; `verify` checks
    every CRC-32 and rewrites the index without the sample."""
    copy = damaged_copy(shards, tmp_path)
    flow_loader(copy, "dali")
    tar, sample, key = first_sample(copy)
    damage_in_place(tar, sample["cur.jpg"])
    blind = flow_loader(copy, "dali")
    assert key in epoch_keys(blind) and blind.skipped == {}  # the documented gap
    result = run_verify(copy)
    assert result.returncode == 1
    assert f"{tar}: sample {key!r}: checksum mismatch (cur.jpg: CRC-32" in result.stderr
    loader = flow_loader(copy, "dali")
    assert loader.skipped == {"checksum mismatch": 1} and key not in epoch_keys(loader)


def same_length_png(size: tuple[int, int], length: int) -> bytes:
    """A valid PNG of `size`, padded with a text chunk to exactly `length` bytes."""
    png = encoded(size, "PNG")
    pad = length - len(png) - 12  # a chunk: length, type, data, CRC
    assert pad >= 0
    chunk_data = b"Comment\0" + b"x" * (pad - 8)
    chunk = (len(chunk_data).to_bytes(4, "big") + b"tEXt" + chunk_data
             + zlib.crc32(b"tEXt" + chunk_data).to_bytes(4, "big"))
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_same_length_png_of_another_size_written_in_place_is_skipped(tmp_path, shards,
                                                                        backend, caplog):
    """A flow member replaced in place by a valid PNG too small for the crop, of the very
    same length (size and mtime of the tar kept). DALI fails on the crop window without
    naming the sample: every shard is scanned again on the host, which names it."""
    copy = damaged_copy(shards, tmp_path)
    tar, sample, key = first_sample(copy, shard=1)
    offset, size, _ = sample["flow_next.png"]
    stat = tar.stat()
    overwrite(tar, offset, same_length_png((20, 20), size))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level(logging.WARNING):
        loader = flow_loader(copy, backend)
        seen = epoch_keys(loader) + epoch_keys(loader)
    assert key not in seen and list(loader.bad) == [(str(tar), key)]
    # webdataset checks the CRC-32 first; DALI's rescan reads the size before it
    expected = ("checksum mismatch (flow_next.png" if backend == "webdataset"
                else "wrong size (flow_next.png: 20x20, the json says 96x64)")
    assert loader.bad[(str(tar), key)].startswith(expected)
    assert f"{tar}: sample {key}: {expected}" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_past_max_bad_samples_the_loader_stops_with_one_line(tmp_path, shards, backend):
    copy = damaged_copy(shards, tmp_path)
    flow_loader(copy, backend)
    for which in (0, 1):
        tar, sample, _ = first_sample(copy, which=which)
        damage_in_place(tar, sample["flow_next.png"])
    loader = flow_loader(copy, backend, "data.max_bad_samples=1")
    with pytest.raises(BadSamplesError) as raised:
        for _ in range(2):
            epoch_keys(loader)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{tar}: sample ")
    assert "checksum mismatch (flow_next.png" in message
    assert "more than data.max_bad_samples = 1" in message
    assert f"tricolor-shards verify {copy}" in message and len(loader.bad) == 2


def test_the_trainer_skips_and_counts_or_stops_with_one_line_naming_the_sample(
        tmp_path, shards, capsys, caplog):
    """The real trainer (one CPU process) on shards damaged in place after indexing: it skips
    and counts what fails while read and completes; with data.max_bad_samples=0 the first
    such sample ends the run, exit 1, with one line that names it."""
    from test_trainer import run_args, run_main

    copy = damaged_copy(shards, tmp_path)
    for entry in train_shards(copy)[:2]:  # every sample of two of the three train shards
        tar = copy / entry["tar"]
        for sample in parse_index(tar.with_suffix(".idx").read_text()):
            damage_in_place(tar, sample["cur.jpg"])
    args = run_args(copy, tmp_path / "runs", "data.backend=webdataset")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        assert run_main([*args, "name=lenient"]) == 0
    assert "checksum mismatch (cur.jpg: CRC-32" in caplog.text
    assert "skipped while reading the train split" in caplog.text
    assert run_main([*args, "name=strict", "data.max_bad_samples=0"]) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("data error:")]
    assert f"data error: {copy}/" in line and ": sample " in line
    assert "checksum mismatch (cur.jpg: CRC-32" in line and "data.max_bad_samples = 0" in line


# --- build --overwrite ---------------------------------------------------------------------


def test_overwrite_in_a_folder_without_a_data_set_keeps_files_with_shard_names(tmp_path,
                                                                               shards):
    """A user's tar that carries an old shard-style name, in a folder no build wrote: a build
    refuses, and one with --overwrite builds beside it, removing nothing."""
    out = tmp_path / "mine"
    out.mkdir()
    theirs = {"train-000000.tar": (shards / train_shards(shards)[0]["tar"]).read_bytes(),
              "train-000000.idx": (shards / train_shards(shards)[0]["index"]).read_bytes()}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    video = scene_video(tmp_path / "v.mp4", [8])
    build = [sys.executable, "-m", "shards", "build", str(video), "--out", str(out),
             "--val-fraction", "0"]
    refused = subprocess.run(build, capture_output=True, text=True)
    assert refused.returncode == 1
    assert "no tricolor data set" in refused.stderr and "--overwrite" in refused.stderr
    assert subprocess.run([*build, "--overwrite"], capture_output=True).returncode == 0
    for name, data in theirs.items():
        assert (out / name).read_bytes() == data
    again = subprocess.run([*build, "--overwrite"], capture_output=True)  # replaces its own
    assert again.returncode == 0
    for name, data in theirs.items():
        assert (out / name).read_bytes() == data
    result = run_verify(out)  # named, and kept
    assert result.returncode == 1
    assert all("delete it yourself" in line for line in result.stderr.splitlines()
               if line.startswith("error:"))
