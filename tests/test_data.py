"""The data loader: real DALI pipelines (CPU here) and the webdataset fallback."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import kornia
import numpy as np
import pytest
import torch
from PIL import Image
from videos import scene_video

from models.colour import denormalize_lab
from shards.cli import main as shards_main
from shards.tario import index_text, split_member_name
from trainer.config import load_config
from trainer.data import TripletLoader, dali_available
from trainer.data.samples import NoSamplesError
from trainer.data.transforms import line_art, rgb_to_lab_triplets

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI wheel")),
    "webdataset",
]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """The start-up scan remembers verified shards under $XDG_CACHE_HOME: not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """48 training triplets (two scenes of 26 frames, 96x64) in shards of 10."""
    tmp = tmp_path_factory.mktemp("data")
    video = scene_video(tmp / "v.mp4", [26, 26], width=96, height=64)
    out = tmp / "shards"
    assert shards_main(["build", str(video), "--out", str(out), "--short-side", "64",
                        "--val-fraction", "0", "--samples-per-shard", "10"]) == 0
    return out


def data_cfg(shards: Path, *overrides: str):
    return load_config(None, [f"data.shards={shards}", "data.crop_size=32",
                              "data.batch_size=4", "data.num_threads=1", *overrides]).data


def make_loader(shards, backend="dali", rank=0, world=1, mode="grey", *overrides):
    cfg = data_cfg(shards, f"data.backend={backend}", *overrides)
    return TripletLoader(cfg, mode, "train", rank, world, torch.device("cpu"), seed=3)


def read_tar_samples(shards: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    samples = {}
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = split_member_name(m.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def lab_to_rgb(cond: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Grey-mode batch item [3, 1, H, W] + [3, 2, H, W] -> RGB [3, H, W, 3] in 0..255."""
    lab = denormalize_lab(torch.cat([cond, target], dim=1))
    return (kornia.color.lab_to_rgb(lab).permute(0, 2, 3, 1).numpy() * 255.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_have_the_contracted_shapes_dtypes_and_ranges(shard_dir, backend):
    loader = make_loader(shard_dir, backend)
    batches = list(loader)
    assert len(batches) == len(loader) == 12  # 48 samples / batch 4
    b = batches[0]
    assert b.cond.shape == (4, 3, 1, 32, 32) and b.target.shape == (4, 3, 2, 32, 32)
    assert b.cond.dtype == b.target.dtype == torch.float32
    assert -1.0 <= b.cond.min() and b.cond.max() <= 1.0 and b.cond.std() > 0.05
    assert b.target.abs().max() <= 1.0 and b.target.std() > 0.01  # the scenes are tinted
    assert len(b.keys) == 4 and all(k.startswith("v-") for k in b.keys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_line_art_mode_yields_edge_maps(shard_dir, backend):
    b = next(iter(make_loader(shard_dir, backend, 0, 1, "lineart")))
    assert b.cond.shape == (4, 3, 1, 32, 32) and b.target.shape == (4, 3, 3, 32, 32)
    values = set(b.cond.unique().tolist())
    assert values <= {-1.0, 1.0}
    lines = (b.cond == -1).float().mean().item()
    assert 0.01 < lines < 0.6  # a textured frame has edges, but is not all edge


def test_line_art_draws_the_outline_of_a_square():
    rgb = torch.zeros(1, 1, 32, 32, 3, dtype=torch.uint8)
    rgb[:, :, 8:24, 8:24] = 255
    edges = line_art(rgb_to_lab_triplets(rgb)[0], 0.1, 0.2)[0, 0] == -1
    assert edges.any()
    ys, xs = torch.nonzero(edges, as_tuple=True)
    near_border = torch.minimum((ys - 8).abs().minimum((ys - 23).abs()),
                                (xs - 8).abs().minimum((xs - 23).abs()))
    assert near_border.max() <= 1  # every line pixel lies on the square's outline
    assert not edges[12:20, 12:20].any() and not edges[:4].any()


def test_lab_round_trip_error_is_below_1e_3_of_the_range():
    rng = np.random.default_rng(0)
    rgb = torch.from_numpy(rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8))
    lab = rgb_to_lab_triplets(rgb)
    assert lab.shape == (2, 3, 3, 16, 16) and lab.abs().max() <= 1.0
    back = kornia.color.lab_to_rgb(denormalize_lab(lab.flatten(0, 1)))
    original = rgb.flatten(0, 1).permute(0, 3, 1, 2).float() / 255
    assert (back - original).abs().max() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_frames_get_the_same_crop_and_flip(shard_dir, backend):
    source = read_tar_samples(shard_dir)
    batch = next(iter(make_loader(shard_dir, backend)))
    for i, key in enumerate(batch.keys):
        got = lab_to_rgb(batch.cond[i], batch.target[i])  # [3, 32, 32, 3]
        placements = []
        for j, member in enumerate(("prev.jpg", "cur.jpg", "next.jpg")):
            full = np.asarray(Image.open(io.BytesIO(source[key][member])).convert("RGB"),
                              dtype=np.float32)
            placements.append(best_placement(full, got[j]))
        assert placements[0][:3] == placements[1][:3] == placements[2][:3], placements
        assert max(p[3] for p in placements) < 3.0  # RGB RMSE after the Lab round trip


def best_placement(full: np.ndarray, crop: np.ndarray):
    """(y, x, flipped, rmse) of the window of `full` that `crop` matches best."""
    h, w = crop.shape[:2]
    best = None
    for flipped in (False, True):
        c = crop[:, ::-1] if flipped else crop
        windows = np.lib.stride_tricks.sliding_window_view(full, (h, w, 3))[:, :, 0]
        err = ((windows - c) ** 2).mean(axis=(2, 3, 4))
        y, x = np.unravel_index(np.argmin(err), err.shape)
        if best is None or err[y, x] < best[3] ** 2:
            best = (int(y), int(x), flipped, float(np.sqrt(err[y, x])))
    return best


RANK_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_data import make_loader
rank, backend = int(sys.argv[1]), sys.argv[2]
loader = make_loader({shards!r}, backend, rank, 2)
epochs = [[k for b in loader for k in b.keys] for _ in range(2)]
print(json.dumps({{"epochs": epochs, "steps": len(loader)}}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_see_every_sample_once_per_epoch(shard_dir, backend):
    script = RANK_SCRIPT.format(tests=str(Path(__file__).parent), shards=str(shard_dir))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), backend],
                              stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    everything = set(read_tar_samples(shard_dir))
    assert results[0]["steps"] == results[1]["steps"] == 6  # 24 samples per rank, batch 4
    for epoch in range(2):
        seen = [results[r]["epochs"][epoch] for r in (0, 1)]
        assert len(seen[0]) == len(set(seen[0])) == 24
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) == everything


@pytest.mark.parametrize("backend", BACKENDS)
def test_resuming_mid_epoch_replays_exactly_the_uninterrupted_batches(shard_dir, backend):
    reference = make_loader(shard_dir, backend)
    uninterrupted = [(b.cond, b.target, b.keys) for _ in range(2) for b in reference]

    first = make_loader(shard_dir, backend)
    it = iter(first)
    seen = [next(it) for _ in range(5)]
    state = first.state_dict()
    resumed = make_loader(shard_dir, backend)
    resumed.load_state_dict(state)
    rest = [b for b in resumed] + [b for b in resumed]
    batches = [(b.cond, b.target, b.keys) for b in seen + rest]
    assert len(batches) == len(uninterrupted) == 24
    for (c1, t1, k1), (c2, t2, k2) in zip(batches, uninterrupted):
        assert k1 == k2
        assert torch.equal(c1, c2) and torch.equal(t1, t2)


def test_a_different_world_size_restarts_the_epoch_and_says_so(shard_dir, caplog):
    saved = make_loader(shard_dir, "dali" if dali_available() else "webdataset", 0, 2)
    it = iter(saved)
    next(it)
    state = saved.state_dict()
    single = make_loader(shard_dir, saved.backend, 0, 1)
    with caplog.at_level(logging.WARNING):
        single.load_state_dict(state)
    assert "restarting epoch 0 from its start" in caplog.text
    assert len(list(single)) == 12  # the whole epoch, at the new world size


def rewrite_shard(tar_path: Path, edit) -> None:
    """Rewrite a shard with `edit(key, ext, data) -> bytes | None` (None drops the member)
    and regenerate its index, as a damaged-but-indexed shard would look."""
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = edit(*split_member_name(name), data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tar_path.with_suffix(".idx").write_text(index_text(tar_path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_samples_are_skipped_named_and_counted(tmp_path, shard_dir, backend, caplog):
    import shutil

    bad = tmp_path / "shards"
    shutil.copytree(shard_dir, bad)
    tars = sorted(bad.glob("train-*.tar"))
    keys0 = sorted({split_member_name(n)[0] for n in tarfile.open(tars[0]).getnames()})
    rewrite_shard(tars[0], lambda k, e, d: None if (k, e) == (keys0[0], "next.jpg") else d)
    rewrite_shard(tars[0], lambda k, e, d: b"garbage" * 9 if (k, e) == (keys0[1], "cur.jpg")
                  else d)
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 2])  # truncated, its index still lists 10 samples
    with caplog.at_level(logging.WARNING):
        loader = make_loader(bad, backend)
    assert loader.skipped["missing component next.jpg"] == 1
    assert loader.skipped["undecodable JPEG"] == 1
    assert loader.skipped["truncated tar"] >= 4
    assert loader.skipped_total == 2 + loader.skipped["truncated tar"]
    assert f"{tars[0]}: sample {keys0[0]}: missing component" in caplog.text
    assert f"{tars[0]}: sample {keys0[1]}: undecodable JPEG" in caplog.text
    assert f"{tars[1]}: sample" in caplog.text and "truncated tar" in caplog.text
    seen = [k for b in loader for k in b.keys]  # a whole epoch runs through
    assert len(seen) == len(loader) * 4 and keys0[0] not in seen and keys0[1] not in seen


def test_shards_without_a_readable_sample_fail_at_start_up(tmp_path, shard_dir):
    import shutil

    bad = tmp_path / "shards"
    shutil.copytree(shard_dir, bad)
    for tar in bad.glob("train-*.tar"):
        tar.write_bytes(b"")
    with pytest.raises(NoSamplesError, match="0 readable samples"):
        make_loader(bad)


# --- damaged shards and indexes, positions saved at another batch size --------------------


def damaged_copy(shards: Path, tmp_path: Path) -> Path:
    """A copy of the session's `shards` (train: 3 shards) to damage."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


def train_shards(shards: Path) -> list[dict]:
    return json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"]


def train_samples(shards: Path) -> int:
    return sum(entry["samples"] for entry in train_shards(shards))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_frames_whose_crc32_differs_are_skipped_named_and_counted(tmp_path, shards, caplog):
    from trainer.data.samples import parse_index

    bad = damaged_copy(shards, tmp_path)
    tar = bad / train_shards(bad)[0]["tar"]
    first, second = parse_index(tar.with_suffix(".idx").read_text())[:2]
    # Flip bytes inside cur.jpg's entropy-coded data: the JPEG markers stay intact.
    offset, size, name = first["cur.jpg"]
    overwrite(tar, offset + size // 2, bytes(b ^ 0x5A for b in tar.read_bytes()[
        offset + size // 2 : offset + size // 2 + 8]))
    offset, size, _ = second["json"]
    overwrite(tar, offset, b"{" + b"x" * (size - 1))  # the json member unreadable
    keys = [split_member_name(s["cur.jpg"][2])[0] for s in (first, second)]
    with caplog.at_level(logging.WARNING):
        loader = make_loader(bad)
    # the markers passed
    assert dict(loader.skipped) == {"checksum mismatch": 1, "unreadable json": 1}
    assert f"{tar}: sample {keys[0]}: checksum mismatch (cur.jpg: CRC-32" in caplog.text
    assert f"{tar}: sample {keys[1]}: unreadable json (Expecting" in caplog.text
    assert "cannot be detected" not in caplog.text
    seen = [k for b in loader for k in b.keys]  # the real pipeline never gets them
    readable = train_samples(shards) - 2
    assert len(seen) == len(loader) * 4 == readable // 4 * 4 and not set(keys) & set(seen)


def test_shards_without_checksums_load_and_say_once_what_is_not_checked(tmp_path, shards,
                                                                         caplog):
    bad = damaged_copy(shards, tmp_path)

    def drop_crc(key, ext, data):
        return json.dumps({k: v for k, v in json.loads(data).items() if k != "crc32"}).encode() \
            if ext == "json" else data

    for entry in train_shards(bad):
        rewrite_shard(bad / entry["tar"], drop_crc)
    with caplog.at_level(logging.WARNING):
        loader = make_loader(bad)
    n = train_samples(shards)
    assert loader.skipped_total == 0 and len(loader.samples) == n
    assert caplog.text.count("corrupted JPEG data in them cannot be detected") == 1
    assert f"{n} samples in 3 shards record no CRC-32" in caplog.text


MALFORMED_INDEXES = {
    "not an index": lambda text: "garbage\n",
    "bad header": lambda text: "v9 16\n" + text.split("\n", 1)[1],
    "wrong field count": lambda text: text.replace(" cur.jpg ", " ", 1),
    "non-integer": lambda text: text.replace("prev.jpg ", "prev.jpg 1x", 1),
    "past the end": lambda text: "\n".join(
        [text.splitlines()[0]]
        + [" ".join(str(int(f) + 10**9) if i % 4 == 1 else f for i, f in enumerate(line.split()))
           for line in text.splitlines()[1:]]) + "\n",
}


@pytest.mark.parametrize("damage", [*MALFORMED_INDEXES, "not UTF-8", "stale"])
def test_a_malformed_or_stale_index_is_named_and_the_shard_reindexed(tmp_path, shards, damage,
                                                                      caplog):
    bad = damaged_copy(shards, tmp_path)
    entries = train_shards(bad)
    index = bad / entries[0]["index"]
    if damage == "stale":  # the index of another shard of the same build
        index.write_bytes((bad / entries[1]["index"]).read_bytes())
    elif damage == "not UTF-8":
        index.write_bytes(b"\xff\xfe\x00garbage")
    else:
        index.write_text(MALFORMED_INDEXES[damage](index.read_text()))
    before = index.read_bytes()
    with caplog.at_level(logging.WARNING):
        loader = make_loader(bad)
    expected = "stale index" if damage == "stale" else (
        "it lists members past the end" if damage == "past the end" else "malformed index")
    assert f"{index}: {expected}" in caplog.text
    assert "re-indexing" in caplog.text
    assert loader.skipped_total == 0
    reference = make_loader(shards)
    assert [s.lines for s in loader.samples.shards] == [s.lines for s in reference.samples.shards]
    assert index.read_bytes() == before  # the user's file is reported, not rewritten


@pytest.mark.parametrize("damage", ["missing", "empty", "not a tar", "cut, no index"])
def test_a_lost_shard_counts_the_manifests_samples(tmp_path, shards, damage, caplog):
    bad = damaged_copy(shards, tmp_path)
    entry, n = train_shards(bad)[0], train_samples(bad)
    tar = bad / entry["tar"]
    if damage == "missing":
        tar.unlink()
    elif damage == "empty":
        tar.write_bytes(b"")
    elif damage == "not a tar":
        tar.write_bytes(np.random.default_rng(0).bytes(tar.stat().st_size))
    else:
        data = tar.read_bytes()
        tar.write_bytes(data[: len(data) // 2])
        (bad / entry["index"]).unlink()
    with caplog.at_level(logging.WARNING):
        loader = make_loader(bad)
    lost, kept = entry["samples"], n - entry["samples"]
    assert lost > 4 and kept > 0
    assert loader.skipped_total + len(loader.samples) == n  # every manifest sample counted
    reason = {"missing": "missing shard", "empty": "empty shard", "not a tar": "unreadable shard",
              "cut, no index": "truncated tar"}[damage]
    if damage == "cut, no index":
        assert 0 < len(loader.samples) - kept < lost  # the samples before the cut are read
        assert dict(loader.skipped) == {reason: n - len(loader.samples)}
    else:
        assert dict(loader.skipped) == {reason: lost} and len(loader.samples) == kept
    assert str(tar) in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_batch_size_restarts_the_saved_epoch_and_says_so(shards, backend, caplog):
    saved = make_loader(shards, backend)  # batch 4
    it = iter(saved)
    next(it), next(it)
    state = saved.state_dict()
    assert state["batch_size"] == 4 and state["step"] == 2
    resumed = make_loader(shards, backend, 0, 1, "grey", "data.batch_size=8")
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    assert "batch_size 4" in caplog.text and "restarting epoch 0 from its start" in caplog.text
    for epoch in (0, 1):  # a full, clean epoch, and the next one
        keys = [k for b in resumed for k in b.keys]
        assert len(keys) == len(set(keys)) == len(resumed) * 8 == train_samples(shards) // 8 * 8
        assert resumed.epoch == epoch + 1
    older = {k: v for k, v in state.items() if k != "batch_size"}  # saved before the key
    again = make_loader(shards, backend)
    again.load_state_dict(older)
    assert len(list(again)) == len(again)  # restarted too: the position cannot be trusted


def test_a_manifest_entry_outside_the_shard_folder_is_refused_by_name(tmp_path, shards):
    from shards.manifest import ManifestError

    bad = damaged_copy(shards, tmp_path)
    outside = tmp_path / "outside.tar"
    outside.write_bytes((bad / train_shards(bad)[0]["tar"]).read_bytes())
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["tar"] = "../outside.tar"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"shard entry '\.\./outside\.tar'"):
        make_loader(bad)


def test_a_verified_shard_is_hashed_again_only_once_it_changes(tmp_path, shards, monkeypatch):
    import os

    from trainer.data.samples import VerifiedCache, parse_index

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copy = damaged_copy(shards, tmp_path)
    (copy / "good-samples.json").unlink()  # the cache is the fallback scan's
    assert make_loader(copy).skipped_total == 0
    assert len(list(VerifiedCache.directory().iterdir())) == 3  # every train shard remembered
    tar = copy / train_shards(copy)[0]["tar"]
    offset, size, _ = parse_index(tar.with_suffix(".idx").read_text())[0]["cur.jpg"]
    stat = tar.stat()
    overwrite(tar, offset + size // 2, b"\x00" * 8)  # damaged in place, markers intact
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert make_loader(copy).skipped_total == 0  # same size and mtime: not hashed again
    os.utime(tar)  # the file changed: its verdict no longer applies
    assert dict(make_loader(copy).skipped) == {"checksum mismatch": 1}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tar))  # a cache that cannot be written
    assert dict(make_loader(copy).skipped) == {"checksum mismatch": 1}


def test_an_unreadable_index_is_named_and_the_shard_reindexed(tmp_path, shards, caplog):
    """An `.idx` that cannot be read at all (here a directory; likewise no permission) is
    reported like a malformed one, and the tar indexed instead: no traceback on every rank."""
    from trainer.data.samples import scan_split

    bad = damaged_copy(shards, tmp_path)
    index = bad / train_shards(bad)[0]["index"]
    index.unlink()
    index.mkdir()
    with caplog.at_level(logging.WARNING):
        found = scan_split(bad, "train")
    assert f"{index}: unreadable index (Is a directory)" in caplog.text
    assert "re-indexing" in caplog.text
    reference = scan_split(shards, "train")
    assert [s.lines for s in found.shards] == [s.lines for s in reference.shards]
    assert found.fingerprint() == reference.fingerprint() and not found.skipped


def test_a_scan_error_is_a_data_error(tmp_path, shards, monkeypatch):
    """A scan error that is not a data error (an OSError) becomes one in
    `select_samples_once`; another exception is raised as it is."""
    from accelerate import Accelerator

    import trainer.data
    from trainer.data import select_samples_once

    path = tmp_path / "train-000000.idx"

    def unreadable(*args):
        raise IsADirectoryError(21, "Is a directory", str(path))

    monkeypatch.setattr(trainer.data, "select_samples", unreadable)
    cfg = data_cfg(shards)
    with pytest.raises(NoSamplesError,
                       match=rf"cannot scan the shards: .*Is a directory: '{path}'"):
        select_samples_once(cfg, "train", Accelerator(cpu=True))
    monkeypatch.setattr(trainer.data, "select_samples", lambda *a: {}["bug"])
    with pytest.raises(KeyError):
        select_samples_once(cfg, "train", Accelerator(cpu=True))


# --- the scan once per data set (good-samples.json), data.mmap, data.val_samples ----------

SELECT_RANK = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the checkout under test
from pathlib import Path

import torch
from accelerate import PartialState

import trainer.data
from trainer.config import load_config
from trainer.data import TripletLoader, samples, select_samples_once

state = PartialState(cpu=True)
reads = []  # what this rank read of the shard directory
for module, name in ((samples, "read_good_samples"), (samples, "scan_shard"),
                     (samples, "load_manifest"), (trainer.data, "scan_split")):
    def recorded(*args, _real=getattr(module, name), _name=name, **kwargs):
        reads.append(_name)
        return _real(*args, **kwargs)
    setattr(module, name, recorded)
cfg = load_config(None, [f"data.shards={sys.argv[2]}", "data.crop_size=32",
                         "data.batch_size=2", "data.num_threads=1"]).data
report = {"rank": state.process_index}
found = select_samples_once(cfg, "train", state)
loader = TripletLoader(cfg, "grey", "train", state.process_index, state.num_processes,
                       torch.device("cpu"), seed=0, samples=found)
report["train"] = [found.fingerprint(), len(found), len(loader)]
try:
    select_samples_once(cfg, "test", state)  # no such split: an error on the main process
except Exception as e:
    report["test"] = [type(e).__name__, str(e)]
report["reads"] = reads
Path(sys.argv[3], f"rank{state.process_index}.json").write_text(json.dumps(report))
state.wait_for_everyone()
torch.distributed.destroy_process_group()  # no rank exits while gloo still talks to it
"""


def test_one_process_selects_the_samples_for_every_rank(tmp_path, shards):
    """`select_samples_once` on 2 real ranks (gloo): rank 1 reads nothing of the shard
    directory (no manifest, no good-samples.json, no scan) and gets rank 0's very sample
    list, which it reads through `TripletLoader(samples=...)`; an error of rank 0 (a split
    the manifest lacks) is raised on both ranks."""
    from launching import ROOT, launch

    from trainer.data.samples import scan_split

    script = tmp_path / "select_rank.py"
    script.write_text(SELECT_RANK)
    result = launch(str(script), str(ROOT), str(shards), str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = scan_split(shards, "train", world_size=2)
    for report in ranks:
        assert report["train"] == [whole.fingerprint(), len(whole), len(whole) // 2 // 2]
        assert report["test"] == ["NoSamplesError", f"{shards}/manifest.json: no split 'test'"]
    assert ranks[1]["reads"] == []
    assert ranks[0]["reads"].count("scan_split") == 2 and "read_good_samples" in ranks[0]["reads"]
    assert "scan_shard" not in ranks[0]["reads"]  # the index holds: no shard opened


def count_sample_checks(monkeypatch) -> list[int]:
    """How often the scan checks a sample (`shards.check.sample_problem`)."""
    from shards import scan

    calls = [0]
    real = scan.sample_problem

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(scan, "sample_problem", counted)
    return calls


def test_the_good_samples_index_replaces_the_scan_until_a_shard_changes(tmp_path, shards,
                                                                         monkeypatch, caplog):
    """`build` wrote good-samples.json: a loader opens no shard (no per-member check) and gets
    the very list the scan gives; a shard changed after indexing (here cut short) is found
    stale, named, and scanned again (only it), with the scan's verdict."""
    from trainer.data.samples import scan_split

    copy = damaged_copy(shards, tmp_path)
    assert (copy / "good-samples.json").is_file()
    checks = count_sample_checks(monkeypatch)
    with caplog.at_level(logging.WARNING):
        indexed = scan_split(copy, "train")
    assert checks[0] == 0 and not caplog.text
    (copy / "good-samples.json").rename(tmp_path / "good-samples.json")
    with caplog.at_level(logging.WARNING):
        scanned = scan_split(copy, "train")
    assert checks[0] == len(scanned) and "no good-samples index" in caplog.text
    assert indexed.fingerprint() == scanned.fingerprint()  # the same list either way
    assert [s.lines for s in indexed.shards] == [s.lines for s in scanned.shards]
    (tmp_path / "good-samples.json").rename(copy / "good-samples.json")

    entry = train_shards(copy)[1]
    tar = copy / entry["tar"]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    checks[0] = 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loader = make_loader(copy)
    assert 0 < checks[0] <= entry["samples"]  # the cut shard alone is scanned
    assert "1 of 3 train shards changed since good-samples.json" in caplog.text
    assert entry["tar"] in caplog.text and f"{tar}: sample" in caplog.text
    lost = loader.skipped["truncated tar"]
    assert lost > 0 and dict(loader.skipped) == {"truncated tar": lost}
    assert len(loader.samples) == train_samples(copy) - lost


def test_verify_rewrites_the_index_and_it_records_what_is_skipped(tmp_path, shards,
                                                                   monkeypatch, caplog):
    """A shard damaged after the build: `verify` reports it and rewrites the index, which
    records the skipped sample; loaders then skip and count it without opening a shard."""
    from trainer.data.samples import parse_index

    copy = damaged_copy(shards, tmp_path)
    entry = train_shards(copy)[0]
    tar = copy / entry["tar"]
    first = parse_index((copy / entry["index"]).read_text())[0]
    offset, size, name = first["cur.jpg"]
    overwrite(tar, offset + size // 2, b"\x00" * 8)  # markers intact: only the CRC-32 tells
    before = (copy / "good-samples.json").read_bytes()
    assert shards_main(["verify", str(copy)]) == 1  # the damage is a problem for verify
    assert (copy / "good-samples.json").read_bytes() != before
    checks = count_sample_checks(monkeypatch)
    with caplog.at_level(logging.WARNING):
        loader = make_loader(copy)
    assert checks[0] == 0
    assert dict(loader.skipped) == {"checksum mismatch": 1}
    assert split_member_name(name)[0] not in loader.samples.keys()
    assert f"{tar}: 1 samples skipped when the shards were indexed" in caplog.text


def test_an_unreadable_good_samples_index_falls_back_to_the_scan(tmp_path, shards, caplog):
    from trainer.data.samples import scan_split

    copy = damaged_copy(shards, tmp_path)
    (copy / "good-samples.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        found = scan_split(copy, "train")
    assert "unreadable good-samples index" in caplog.text
    assert found.fingerprint() == scan_split(shards, "train").fingerprint()


@pytest.mark.skipif(not dali_available(), reason="no DALI wheel")
@pytest.mark.parametrize("mmap", [False, True])
def test_the_dali_reader_reads_without_mmap(shards, monkeypatch, mmap):
    """data.mmap reaches DALI's reader as dont_use_mmap (recorded from the call itself), and
    the reader reads every sample once without mmap."""
    from nvidia.dali import fn

    calls = []
    reader = fn.readers.webdataset

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return reader(*args, **kwargs)

    monkeypatch.setattr(fn.readers, "webdataset", recorded)
    loader = make_loader(shards, "dali", 0, 1, "grey", f"data.mmap={str(mmap).lower()}")
    assert loader.cfg.mmap is mmap
    if mmap:
        next(iter(loader))  # builds the pipeline
    else:
        keys = [k for b in loader for k in b.keys]
        assert len(keys) == len(set(keys)) == len(loader) * 4
        assert set(keys) <= set(loader.samples.keys())
    assert len(calls) == 1 and calls[0]["dont_use_mmap"] is (not mmap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_samples_reads_a_fixed_evenly_spaced_subset(shards, backend):
    """data.val_samples = 8 of the val split: the same 8 samples at every construction and
    every epoch, evenly spaced over the full list; and never less than a batch per rank."""
    def val_loader(world=1, rank=0, *overrides):
        cfg = data_cfg(shards, f"data.backend={backend}", "data.val_samples=8", *overrides)
        return TripletLoader(cfg, "grey", "val", rank, world, torch.device("cpu"), seed=3,
                             shuffle=False, augment=False)

    full = TripletLoader(data_cfg(shards, f"data.backend={backend}"), "grey", "val", 0, 1,
                         torch.device("cpu"), seed=3, shuffle=False, augment=False)
    every = full.samples.keys()
    assert len(every) > 8
    chosen = [every[i * len(every) // 8] for i in range(8)]
    first, second = val_loader(), val_loader()
    assert first.samples.keys() == second.samples.keys() == chosen
    for loader in (first, second):
        for _ in range(2):  # two validations
            assert sorted(k for b in loader for k in b.keys) == sorted(chosen)
    two = [val_loader(2, rank) for rank in (0, 1)]  # 2 ranks: the same 8, 4 each
    assert sorted(k for loader in two for b in loader for k in b.keys) == sorted(chosen)
    small = val_loader(2, 0, "data.val_samples=2")  # raised to one batch of 4 per rank
    assert len(small.samples) == 8 and small.steps_per_epoch == 1
