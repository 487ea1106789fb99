"""Optical flow in the shards (`tricolor-shards build --flow`): stored as OpenCV computes it,
checked by `verify`, read with the frames' crop and flip by both loader backends, and the
temporal loss that uses it."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import BACKENDS, data_cfg, make_loader, read_tar_samples, rewrite_shard
from videos import textured_frames, write_video

from models.losses import temporal_loss, warp
from shards import flow
from shards.cli import main as shards_main
from shards.manifest import ManifestError
from shards.tario import split_member_name
from shards.verify import verify
from shards.video import decode_frames
from trainer.data import TripletLoader


@pytest.fixture(scope="module")
def flow_shards(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Two clips of a texture drifting 2 px per frame (96x64), shards with flow."""
    tmp = tmp_path_factory.mktemp("flow")
    videos = [write_video(tmp / f"m{i}.mp4", textured_frames(12, 96, 64, seed=i,
                                                              tint=(1.0, 0.8, 0.6)))
              for i in range(2)]
    out = tmp / "shards"
    assert shards_main(["build", *map(str, videos), "--out", str(out), "--short-side", "64",
                        "--val-fraction", "0", "--samples-per-shard", "8", "--flow"]) == 0
    return out, videos


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_stored_flow_is_opencvs_flow_of_the_same_frames(flow_shards):
    """Every sample's two fields and masks decode to a fresh DIS flow of the frames the build
    saw, within the storage step (a quarter pixel: rounding error at most 1/8)."""
    out, _ = flow_shards
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["flow"]["method"] == "opencv-dis"
    assert set(flow.MEMBERS) <= set(manifest["members"])
    samples = read_tar_samples(out)
    assert len(samples) == 2 * 10
    frames = {}
    for members in samples.values():
        meta = json.loads(members["json"])
        if meta["source"] not in frames:
            frames[meta["source"]] = [flow.grey(f) for f in
                                      decode_frames(Path(meta["source"]), 64)[1]]
        seq, t = frames[meta["source"]], meta["frame"]
        for member, other in (("flow_prev.png", t - 1), ("flow_next.png", t + 1)):
            stored, mask = flow.decode(png(members[member]))
            fresh = flow.dis_flow(seq[t], seq[other])
            back = flow.dis_flow(seq[other], seq[t])
            storable = (np.abs(fresh) <= flow.LIMIT).all(-1)
            assert np.abs(stored - fresh)[storable].max() <= 1 / 8 + 1e-6, (member, t)
            assert np.array_equal(mask, flow.visible(fresh, back) & storable), (member, t)
            assert mask.mean() > 0.5  # a drifting texture: mostly visible


def warp_errors(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: the masked mean |L_t - L_t-1 warped to t by the flow t -> t-1|, the same
    without the warp, and with the flow's x negated (a flip handled wrongly)."""
    prev, cur = batch.cond[:, 0], batch.cond[:, 1]
    mask, flow = batch.flow_mask[:, 0], batch.flow[:, 0]

    def mean(x):
        return (mask * x).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1)

    mirrored = torch.stack([-flow[:, 0], flow[:, 1]], dim=1)
    return (mean((cur - warp(prev, flow)).abs()), mean((cur - prev).abs()),
            mean((cur - warp(prev, mirrored)).abs()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", [True, False])
def test_after_crop_and_flip_the_flow_still_maps_frame_t_to_t_minus_1(flow_shards, backend,
                                                                      augment):
    """Warping frame t-1 by the loaded flow reproduces frame t within the mask far better
    than no warp, for every sample: a crop window or a flip (which mirrors the field and
    negates its x) applied differently to the flow would break it. Random crops and flips
    (training) and the centre crop (validation)."""
    out, _ = flow_shards
    cfg = data_cfg(out, f"data.backend={backend}", "data.flip=true")
    loader = TripletLoader(cfg, "grey", "train", 0, 1, torch.device("cpu"), seed=3,
                           shuffle=augment, augment=augment, flow=True)
    batches = 0
    for batch in loader:
        assert batch.flow.shape == (4, 2, 2, 32, 32) and batch.flow_mask.shape == (4, 2, 1, 32, 32)
        assert batch.flow_mask.mean() > 0.5
        with_flow, without, wrong_sign = warp_errors(batch)
        assert (with_flow < 0.5 * without).all(), (with_flow, without)
        assert (with_flow < 0.5 * wrong_sign).all(), (with_flow, wrong_sign)
        batches += 1
    assert batches == len(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_without_flow_give_batches_without_flow(tmp_path, flow_shards, backend):
    plain = tmp_path / "plain"
    _, videos = flow_shards
    assert shards_main(["build", str(videos[0]), "--out", str(plain), "--short-side", "64",
                        "--val-fraction", "0", "--samples-per-shard", "8"]) == 0
    batch = next(iter(make_loader(plain, backend)))
    assert batch.flow is None and batch.flow_mask is None
    with pytest.raises(ManifestError, match="records no optical flow"):
        TripletLoader(data_cfg(plain, f"data.backend={backend}"), "grey", "train", 0, 1,
                      torch.device("cpu"), seed=3, flow=True)
    # the trainer says which setting asks for flow
    from accelerate import Accelerator

    from trainer.config import load_config
    from trainer.train import make_loader as trainer_loader

    cfg = load_config("configs/demo.yaml", [f"data.shards={plain}", f"data.backend={backend}",
                                            "loss.lambda_temporal=1"])
    with pytest.raises(ManifestError, match=r"^loss.lambda_temporal = 1.0: .*records no "
                       r"optical flow: .*--flow`, or set loss.lambda_temporal=0$"):
        trainer_loader(cfg, Accelerator(cpu=True), "grey", "train")
    # shards with flow, a loader that does not ask for it: frames only
    batch = next(iter(make_loader(flow_shards[0], backend)))
    assert batch.flow is None


def test_flow_costs_shard_bytes_counted_in_the_manifest(flow_shards):
    out, _ = flow_shards
    manifest = json.loads((out / "manifest.json").read_text())
    listed = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    on_disk = sum(p.stat().st_size for p in out.glob("train-*.tar"))
    assert listed == on_disk


@pytest.mark.parametrize("damage", ["missing", "wrong size"])
def test_verify_names_a_sample_whose_flow_member_is_missing_or_the_wrong_size(
        tmp_path, flow_shards, damage):
    out = tmp_path / "shards"
    shutil.copytree(flow_shards[0], out)
    tar_path = sorted(out.glob("train-*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        victim = split_member_name(tar.getnames()[0])[0]
    small = Image.new("RGB", (10, 10))
    buf = io.BytesIO()
    small.save(buf, format="PNG")

    def edit(key, ext, data):
        if key != victim:
            return data
        if ext == "json":  # the checksum of what is there: only the size is wrong
            meta = json.loads(data)
            meta["crc32"]["flow_next.png"] = zlib.crc32(buf.getvalue())
            return json.dumps(meta).encode()
        if ext != "flow_next.png":
            return data
        return None if damage == "missing" else buf.getvalue()

    rewrite_shard(tar_path, edit)
    manifest = json.loads((out / "manifest.json").read_text())  # as if built that way
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["tar"] == tar_path.name:
            entry["sha256"] = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(out)
    named = [p for p in problems if victim in p]
    assert named, problems
    if damage == "missing":
        assert any("missing component flow_next.png" in p for p in named), named
    else:
        assert any("wrong size (flow_next.png: 10x10, the json says 96x64)" in p
                   for p in named), named


def test_temporal_loss_is_zero_on_a_static_clip_and_positive_on_a_flickering_one():
    torch.manual_seed(0)
    colour = torch.rand(2, 2, 16, 16) * 2 - 1
    still = torch.zeros(2, 2, 16, 16)
    visible = torch.ones(2, 1, 16, 16)
    assert temporal_loss(colour, colour, still, visible).item() == pytest.approx(0, abs=1e-6)
    flicker = colour + 0.3 * torch.sign(torch.randn(2, 2, 1, 1))
    assert temporal_loss(flicker, colour, still, visible).item() == pytest.approx(0.3, abs=1e-6)
    # moved by the flow: the warped previous colour is the same again
    moved = torch.roll(colour, shifts=-2, dims=-1)  # content moves 2 px to the left
    shift = torch.zeros(2, 2, 16, 16)
    shift[:, 0] = 2.0  # pixel x of t is at x + 2 in t-1
    inner = visible.clone()
    inner[..., -2:] = 0  # the last columns came in from outside the frame
    assert temporal_loss(moved, colour, shift, inner).item() == pytest.approx(0, abs=1e-6)
    assert temporal_loss(moved, colour, still, inner).item() > 0.1


def test_the_train_step_adds_the_temporal_loss_when_it_is_on(shards):
    """loss.lambda_temporal > 0 and a batch with flow: G's loss gains lambda_temporal x the
    masked L1 to its own (warped) colour of t-1, logged as Loss/G/temporal; off, no term."""
    from accelerate import Accelerator

    from trainer.config import load_config
    from trainer.step import train_step
    from trainer.train import build_gan

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    for weight in (0.0, 10.0):
        cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "model.ngf=8",
                                                "model.ndf=8", "data.crop_size=32",
                                                "data.batch_size=2", "data.num_threads=1",
                                                # a fresh G that starts at grey would colour
                                                # t and t-1 alike (0): no temporal error
                                                "model.zero_init_head=false",
                                                f"loss.lambda_temporal={weight}"])
        gan = build_gan(cfg, accelerator)
        loader = TripletLoader(cfg.data, "grey", "train", 0, 1, torch.device("cpu"), seed=0,
                               flow=True)
        out = train_step(accelerator, gan, next(iter(loader)), 0)
        if not weight:
            assert "Loss/G/temporal" not in out
            continue
        temporal = out["Loss/G/temporal"].item()
        total = out["Loss/G/total"].item()
        assert temporal > 0
        rest = out["Loss/G/adv"].item() + 20 * out["Loss/G/pixel"].item()
        assert total == pytest.approx(rest + weight * temporal, rel=1e-5)


def test_validation_reads_the_stored_flow_instead_of_running_farneback(flow_shards, monkeypatch):
    """Val shards with flow: the warp error of the truth and of a model comes from the stored
    flow (Farnebäck is never called) and is of the size Farnebäck's gives on the same clips."""
    import metrics
    import metrics.validation
    from models import ModelConfig, build_generator
    from trainer.validate import validate

    out, _ = flow_shards
    cfg = data_cfg(out, "data.backend=webdataset")
    G = build_generator(ModelConfig(ngf=8, depth=3, norm="group", zero_init_head=False)).eval()

    def loader(flow):
        return TripletLoader(cfg, "grey", "train", 0, 1, torch.device("cpu"), seed=0,
                             shuffle=False, augment=False, flow=flow)

    farneback, _ = validate(G, loader(False), metrics.ColorizationMetrics(), "grey")

    def refuse(*args, **kwargs):
        raise AssertionError("Farnebäck was run although the shards carry flow")

    monkeypatch.setattr(metrics.validation, "farneback_flows", refuse)
    stored, _ = validate(G, loader(None), metrics.ColorizationMetrics(), "grey")  # as trainer
    assert 0 <= stored["warp_truth"] < 0.01 and stored["warp"] > stored["warp_truth"]
    for key in ("warp", "warp_truth"):  # another flow, the same order of magnitude
        assert 0.3 < (stored[key] + 1e-4) / (farneback[key] + 1e-4) < 3, (key, stored, farneback)
    assert stored["psnr"] == farneback["psnr"]  # only the flow differs
