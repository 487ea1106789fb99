"""Validation: the same pixels at every validation, and the model scored beside zero chroma."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from test_data import best_placement, lab_to_rgb, read_tar_samples

from metrics import ColorizationMetrics
from models import build_generator, memory_of, no_memory_like
from models.config import ModelConfig
from trainer.config import load_config
from trainer.data import TripletLoader, dali_available
from trainer.train import make_val_loader
from trainer.validate import colorize_triplet, validate

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="no DALI wheel")),
    "webdataset",
]
# Training augmentations switched on, to show that validation ignores them.
AUGMENTED = ["data.flip=true", "data.brightness_jitter=0.3"]


def val_cfg(shards: Path, backend: str):
    return load_config("configs/demo.yaml", [
        f"data.shards={shards}", f"data.backend={backend}", "data.crop_size=32",
        "data.batch_size=2", "data.num_threads=1", "model.ngf=4", "model.depth=2", *AUGMENTED])


def epoch(loader) -> list:
    return [(b.keys, b.cond, b.target) for b in loader]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_val_loader_gives_each_rank_the_same_centre_crops_at_every_epoch(
        shards, backend, one_thread):
    cfg = val_cfg(shards, backend).data
    keys = []
    for rank in (0, 1):  # two ranks of a world of 2, as the trainer shards validation
        loader = TripletLoader(cfg, "grey", "val", rank, 2, torch.device("cpu"), seed=rank,
                               shuffle=False, augment=False)
        first, second = epoch(loader), epoch(loader)
        assert len(first) == len(second) == len(loader) > 1
        for (k1, c1, t1), (k2, c2, t2) in zip(first, second):
            assert k1 == k2
            assert torch.equal(c1, c2) and torch.equal(t1, t2)
        keys.append([k for batch_keys, _, _ in first for k in batch_keys])
    assert not set(keys[0]) & set(keys[1])  # each rank its own slice, at every epoch
    frames = read_tar_samples(shards, "val")
    assert len(keys[0]) + len(keys[1]) == len(frames)

    # The crop is the centre window of the decoded JPEG: unflipped, no brightness change.
    sample_keys, cond, target = first[0]
    for i, key in enumerate(sample_keys):
        got = lab_to_rgb(cond[i], target[i])  # [3, 32, 32, 3]
        for j, member in enumerate(("prev.jpg", "cur.jpg", "next.jpg")):
            full = np.asarray(Image.open(io.BytesIO(frames[key][member])).convert("RGB"),
                              dtype=np.float32)
            h, w = full.shape[:2]
            centre = ((h - 32) // 2, (w - 32) // 2)
            y, x, flipped, rmse = best_placement(full, got[j])
            assert (y, x, flipped) == (*centre, False), (key, member)
            crop = full[centre[0]:centre[0] + 32, centre[1]:centre[1] + 32]
            assert np.sqrt(((crop - got[j]) ** 2).mean()) == pytest.approx(rmse, abs=1e-4)
            assert rmse < 1.0  # 8-bit levels: the Lab round trip only, no brightness gain


def tiny_generator(mode: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator(ModelConfig(mode=mode, ngf=4, depth=2, norm="group",
                                       zero_init_head=False))


@pytest.mark.parametrize("mode", ["grey", "lineart"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_validations_of_the_same_weights_give_identical_metrics(shards, backend, mode,
                                                                     one_thread):
    cfg = val_cfg(shards, backend)
    loader = make_val_loader(cfg, Accelerator(cpu=True), mode)  # the trainer's own val loader
    G = tiny_generator(mode)
    metrics = ColorizationMetrics()
    first, (batch, _) = validate(G, loader, metrics, mode)
    again, (batch_again, _) = validate(G, loader, metrics, mode)
    assert again == first  # exactly: the same pixels, the same clips, the same sums
    assert batch_again.keys == batch.keys
    for key in ("psnr", "psnr_grey", "psnr_gain", "ssim", "ssim_grey", "colourfulness",
                "colourfulness_truth", "cdc", "warp_excess"):
        assert np.isfinite(first[key]), key
    assert first["psnr_gain"] == first["psnr"] - first["psnr_grey"]
    assert first["colourfulness_truth"] > 1.0  # the scenes are tinted


def set_head(G: torch.nn.Module, bias: float) -> None:
    """Zero G's output head but for a constant bias: a,b = tanh(bias) everywhere."""
    heads = [m for name, m in G.named_modules() if name.endswith("head")]
    assert heads, "the generator has no module named *head"
    with torch.no_grad():
        for head in heads:
            head.weight.zero_()
            head.bias.fill_(bias)


def test_the_gain_of_grey_against_itself_is_zero(shards, one_thread):
    """A G that outputs a = b = 0 (tanh(0)) colorizes exactly as zero chroma does, so the
    model and the baseline score the same; a constant tint (tanh(0.1)) does not."""
    cfg = val_cfg(shards, "dali" if dali_available() else "webdataset")
    loader = make_val_loader(cfg, Accelerator(cpu=True), "grey")
    G = tiny_generator("grey")
    set_head(G, 0.0)
    out, _ = validate(G, loader, ColorizationMetrics(), "grey")
    assert out["psnr_gain"] == 0.0
    assert out["psnr"] == out["psnr_grey"] and out["ssim"] == out["ssim_grey"]
    assert out["colourfulness"] < 0.01 < 1.0 < out["colourfulness_truth"]  # grey: no colour

    set_head(G, 0.1)
    tinted, _ = validate(G, loader, ColorizationMetrics(), "grey")
    assert tinted["psnr_grey"] == out["psnr_grey"]  # the same clips: the same baseline
    assert tinted["psnr_gain"] != 0.0 and tinted["colourfulness"] > 1.0


def test_farneback_runs_once_per_sample_across_validations(shards, monkeypatch, one_thread):
    """Without stored flow the warp error needs Farnebäck flow on the CPU: computed at the
    first validation, then taken from the cache by sample key; the metrics do not change."""
    import cv2

    calls = []
    farneback = cv2.calcOpticalFlowFarneback
    monkeypatch.setattr(cv2, "calcOpticalFlowFarneback",
                        lambda *a: calls.append(1) or farneback(*a))
    cfg = val_cfg(shards, "dali" if dali_available() else "webdataset")
    loader = TripletLoader(cfg.data, "grey", "val", 0, 1, torch.device("cpu"), seed=0,
                           shuffle=False, augment=False, flow=False)  # as shards without flow
    G = tiny_generator("grey")
    metrics = ColorizationMetrics()
    first, _ = validate(G, loader, metrics, "grey")
    samples = {key for batch in loader for key in batch.keys}
    assert len(calls) == len(samples) * 2 * 2  # per triplet: 2 pairs, both directions
    again, _ = validate(G, loader, metrics, "grey")
    assert len(calls) == len(samples) * 2 * 2 and len(metrics.flow_cache) == len(samples)
    assert again == first and np.isfinite(first["warp_excess"])


@pytest.mark.parametrize("mode, memory", [("grey", False), ("grey", True), ("lineart", True)])
def test_a_triplet_is_colorized_as_inference_colours_a_clip_of_three_frames(mode, memory):
    """Grey windows padded at the clip's ends; with colour memory, recurrently from none."""
    torch.manual_seed(0)
    G = build_generator(ModelConfig(mode=mode, ngf=4, depth=2, norm="group",
                                    zero_init_head=False, memory=memory)).eval()
    cond = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    pred = colorize_triplet(G, cond, mode)
    with torch.no_grad():
        inputs = ((cond[:, [0, 0, 1]], cond, cond[:, [1, 2, 2]]) if mode == "grey"
                  else cond.unbind(1))
        memory_in, expected = no_memory_like(cond[:, 0], mode), []
        for t, x in enumerate(inputs):
            expected.append(G(x, memory_in) if memory else G(x))
            memory_in = memory_of(expected[-1], cond[:, t])
    expected = torch.stack(expected, dim=1)
    if mode == "grey":
        expected = torch.cat([cond, expected], dim=2)
    assert torch.equal(pred, expected)
