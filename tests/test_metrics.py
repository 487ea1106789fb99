"""Validation metrics: the definitions of metrics.md, and the reduction over two real ranks."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from trainer.metrics import (
    PSNR_CAP_DB,
    ColorizationMetrics,
    clip_cdc,
    farneback_flows,
    js_divergence,
    non_occlusion_mask,
)

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def moving_texture(T: int = 3, H: int = 48, W: int = 64, shift: int = 2, seed: int = 0):
    """A smooth random colour texture translating left by `shift` px per frame:
    (RGB [T, 3, H, W], its luma [T, 1, H, W]), both in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, H // 4 + 2, (W + shift * T) // 4 + 2, generator=g)
    canvas = F.interpolate(coarse, scale_factor=4, mode="bicubic", align_corners=False)
    canvas = canvas.clamp(0, 1)[0]
    rgb = torch.stack([canvas[:, :H, shift * t: shift * t + W] for t in range(T)])
    return rgb, (rgb * LUMA).sum(dim=1, keepdim=True)


def run_metrics(pred, truth, grey, chunks=None) -> dict[str, float]:
    m = ColorizationMetrics()
    for sl in chunks or [slice(None)]:
        m.update(pred[sl], truth[sl], grey[sl])
    return m.compute()


# --- CDC -----------------------------------------------------------------------------------

def test_js_sanity_value():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5])
    assert js_divergence(p, q).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert js_divergence(p, p).item() == 0.0
    disjoint = js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert disjoint.item() == pytest.approx(math.log(2), rel=1e-6)  # the maximum


def test_cdc_static_clip_is_zero():
    rgb, _ = moving_texture(T=3)
    static = rgb[:1].expand(3, -1, -1, -1)[None]  # one frame repeated
    assert clip_cdc(static).item() == 0.0


def test_cdc_flicker_exceeds_steady():
    rgb, _ = moving_texture(T=3)
    gains = torch.tensor([1.0, 0.6, 1.0]).view(3, 1, 1, 1)  # brightness/colour flicker
    steady, flicker = clip_cdc(rgb[None]).item(), clip_cdc((rgb * gains)[None]).item()
    assert 0 < steady < flicker / 5


def test_cdc_uses_dilations_below_T():
    """T = 2 has only dilation 1: the CDC is the JS of the two frames, averaged over channels."""
    rgb, _ = moving_texture(T=2)
    hist = [torch.stack([torch.histc((f[c] * 255).round(), 256, 0, 255) / f[c].numel()
                         for c in range(3)]) for f in rgb]
    expected = js_divergence(hist[0], hist[1]).mean()
    assert clip_cdc(rgb[None]).item() == pytest.approx(expected.item(), rel=1e-5)


# --- warp error ----------------------------------------------------------------------------

def test_farneback_finds_the_translation_and_mask_is_mostly_valid():
    rgb, grey = moving_texture(T=3, shift=2)
    fwd, bwd = farneback_flows(grey[None])
    inner = (..., slice(8, -8), slice(8, -8))
    assert fwd[:, :, 0][inner].median().item() == pytest.approx(-2.0, abs=0.2)
    assert bwd[:, :, 0][inner].median().item() == pytest.approx(2.0, abs=0.2)
    assert fwd[:, :, 1][inner].abs().median().item() < 0.2
    mask = non_occlusion_mask(fwd.flatten(0, 1), bwd.flatten(0, 1))
    assert mask.mean().item() > 0.7


def test_warp_error_consistent_vs_flickering_colours():
    rgb, grey = moving_texture(T=3, shift=2)
    flicker = torch.stack([rgb[t].roll(t, dims=0) for t in range(3)])  # same grey, new chroma
    steady = run_metrics(rgb[None], rgb[None], grey[None])
    flickering = run_metrics(flicker[None], rgb[None], grey[None])
    assert steady["warp"] < 2e-3
    assert flickering["warp"] > 20 * steady["warp"]
    assert flickering["warp_truth"] == steady["warp"]  # the floor depends on truth only
    assert flickering["warp_excess"] == pytest.approx(
        flickering["warp"] - flickering["warp_truth"])


def test_truth_floors_equal_metrics_when_pred_is_truth():
    rgb, grey = moving_texture(T=3)
    noisy = (rgb + 0.05 * torch.randn(rgb.shape, generator=torch.Generator().manual_seed(1)))
    out = run_metrics(noisy.clamp(0, 1)[None], noisy.clamp(0, 1)[None], grey[None])
    assert out["warp"] == out["warp_truth"] > 0
    assert out["warp_excess"] == 0.0
    assert out["cdc"] == out["cdc_truth"] > 0


# --- PSNR / SSIM ---------------------------------------------------------------------------

def test_psnr_ssim_match_torchmetrics_per_clip():
    g = torch.Generator().manual_seed(0)
    clips = []
    for i, T in enumerate((3, 3, 2)):  # two updates with different T
        rgb, grey = moving_texture(T=T, H=32, W=40, seed=i)
        pred = (rgb + (0.02 + 0.05 * i) * torch.randn(rgb.shape, generator=g)).clamp(0, 1)
        clips.append((pred, rgb, grey))
    m = ColorizationMetrics()
    m.update(*(torch.stack(x) for x in zip(*clips[:2])))
    m.update(*(x[None] for x in clips[2]))
    out = m.compute()
    # Per clip: PSNR over all of the clip's frames at once, SSIM the mean over its frames.
    psnr = [peak_signal_noise_ratio(p, t, data_range=1.0).item() for p, t, _ in clips]
    ssim = [structural_similarity_index_measure(p, t, data_range=1.0).item()
            for p, t, _ in clips]
    assert out["psnr"] == pytest.approx(sum(psnr) / 3, rel=1e-5)
    assert out["ssim"] == pytest.approx(sum(ssim) / 3, rel=1e-5)
    # ...which is not the same as pooling all frames (the per-video convention matters).
    pooled = peak_signal_noise_ratio(torch.cat([c[0] for c in clips]),
                                     torch.cat([c[1] for c in clips]), data_range=1.0)
    assert abs(out["psnr"] - pooled.item()) > 0.5


def test_psnr_of_identical_clips_is_capped():
    rgb, grey = moving_texture(T=3)
    assert peak_signal_noise_ratio(rgb, rgb, data_range=1.0).item() == math.inf  # uncapped
    noisy = (rgb + 0.1 * torch.randn(rgb.shape, generator=torch.Generator().manual_seed(2)))
    pred, truth = torch.stack([rgb, noisy.clamp(0, 1)]), torch.stack([rgb, rgb])
    out = run_metrics(pred, truth, torch.stack([grey, grey]))
    noisy_psnr = peak_signal_noise_ratio(noisy.clamp(0, 1), rgb, data_range=1.0).item()
    assert out["psnr"] == pytest.approx((PSNR_CAP_DB + noisy_psnr) / 2, rel=1e-5)
    assert out["ssim"] <= 1.0
    json.loads(json.dumps(out, allow_nan=False))  # finite: valid metrics.jsonl


def test_runs_in_fp32_under_bf16_autocast():
    rgb, grey = moving_texture(T=3)
    pred = (rgb * 0.9)[None]
    expected = run_metrics(pred, rgb[None], grey[None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_metrics(pred, rgb[None], grey[None])
    assert got == pytest.approx(expected, rel=1e-6)


def test_rejects_bad_shapes():
    rgb, grey = moving_texture(T=3)
    m = ColorizationMetrics()
    with pytest.raises(ValueError, match="grey"):
        m.update(rgb[None], rgb[None], grey)
    with pytest.raises(ValueError, match="T >= 2"):
        m.update(rgb[None, :1], rgb[None, :1], grey[None, :1])


# --- two real ranks (gloo) -----------------------------------------------------------------

def dataset():
    """Four clips (T = 3) whose quality differs a lot from clip to clip."""
    g = torch.Generator().manual_seed(123)
    pred, truth, grey = [], [], []
    for i in range(4):
        rgb, luma = moving_texture(T=3, H=32, W=48, seed=10 + i)
        gains = torch.tensor([1.0, 1.0 - 0.1 * i, 1.0]).view(3, 1, 1, 1)
        noise = (0.01 + 0.06 * i) * torch.randn(rgb.shape, generator=g)
        pred.append((rgb * gains + noise).clamp(0, 1))
        truth.append(rgb)
        grey.append(luma)
    return torch.stack(pred), torch.stack(truth), torch.stack(grey)


SPLIT = {0: [slice(0, 2), slice(2, 3)], 1: [slice(3, 4)]}  # 3 clips vs 1: unequal halves


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pred, truth, grey = dataset()
        m = ColorizationMetrics()
        for sl in SPLIT[rank]:
            m.update(pred[sl], truth[sl], grey[sl])
        result = m.compute()  # torchmetrics syncs the states across ranks here
        m.sync()  # the reduced states themselves: counts must be totals, not means
        result["_clips"] = int(m.clips)
        m.unsync()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    ctx = mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 120 s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    pred, truth, grey = dataset()
    whole = run_metrics(pred, truth, grey)
    for r in ranks:
        assert r.pop("_clips") == 4
        assert r.keys() == whole.keys()
        for k, v in whole.items():
            assert r[k] == pytest.approx(v, rel=1e-6), k

    # The check can fail: the mean of per-rank means (3 clips vs 1) is far from the truth.
    local = [run_metrics(pred, truth, grey, SPLIT[r]) for r in (0, 1)]
    for k in ("psnr", "ssim", "cdc", "warp"):
        averaged = (local[0][k] + local[1][k]) / 2
        assert averaged != pytest.approx(whole[k], rel=1e-2), k
