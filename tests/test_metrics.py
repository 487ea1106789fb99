"""Validation metrics: their published definitions, and the reduction over two real ranks."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from metrics import (
    PSNR_CAP_DB,
    ColorizationMetrics,
    VideoScores,
    ciede2000,
    clip_cdc,
    clip_psnr,
    clip_ssim,
    clip_warp_error,
    colourfulness,
    farneback_flows,
    histograms,
    js_divergence,
    mean_ciede2000,
    non_occlusion_mask,
)
from models.colour import rgb_to_cielab

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


def as_rgb(grey: torch.Tensor) -> torch.Tensor:
    """A grey frame [..., 1, H, W] as RGB [..., 3, H, W]: a zero-chroma colorization."""
    return grey.expand(*grey.shape[:-3], 3, *grey.shape[-2:])


def run_metrics(pred, truth, grey, chunks=None, baseline=None) -> dict[str, float]:
    baseline = as_rgb(grey) if baseline is None else baseline
    m = ColorizationMetrics()
    for sl in chunks or [slice(None)]:
        m.update(pred[sl], truth[sl], grey[sl], baseline[sl])
    return m.compute()


def test_histograms_count_as_bincount_does():
    video = torch.rand(2, 3, 3, 17, 19)
    video[0, 0, 0, :4] = 0.0  # both ends of the range
    video[1, 2, 1, :4] = 1.0
    levels = (video.clamp(0, 1) * 255).round().long().flatten(-2)
    want = torch.stack([torch.bincount(row, minlength=256) for row in levels.flatten(0, -2)])
    got = histograms(video)
    assert torch.equal(got, want.view(*video.shape[:-2], 256).float() / (17 * 19))


@pytest.fixture
def farneback_calls(monkeypatch) -> list:
    """One entry per Farnebäck flow computed."""
    import cv2

    calls = []
    farneback = cv2.calcOpticalFlowFarneback
    monkeypatch.setattr(cv2, "calcOpticalFlowFarneback",
                        lambda *a: calls.append(1) or farneback(*a))
    return calls


def moving_clips(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(truth, grey, pred) of n moving-texture clips, pred a noisy truth."""
    rgb, grey = zip(*(moving_texture(seed=s) for s in range(n)))
    truth, grey = torch.stack(rgb), torch.stack(grey)
    return truth, grey, (truth + 0.05 * torch.rand_like(truth)).clamp(0, 1)


def test_farneback_flows_are_cached_by_key(farneback_calls):
    """With keys, each clip's flows are computed once, across updates and resets, and the
    warp errors are those computed afresh; a key repeated within a batch (the padding of a
    last batch) is computed once."""
    calls = farneback_calls
    truth, grey, pred = moving_clips(3)
    fresh = run_metrics(pred, truth, grey, chunks=[slice(0, 2), slice(2, 3)])  # as below
    assert len(calls) == 3 * 2 * 2  # 3 clips of 2 pairs, both directions
    calls.clear()
    m = ColorizationMetrics()
    for _ in range(2):  # two validations
        m.reset()
        m.update(pred[:2], truth[:2], grey[:2], as_rgb(grey[:2]), keys=["a", "b"])
        m.update(pred[2:], truth[2:], grey[2:], as_rgb(grey[2:]), keys=["c"])
        assert m.compute() == fresh
    assert len(calls) == 3 * 2 * 2
    calls.clear()
    m.update(pred[[0, 0]], truth[[0, 0]], grey[[0, 0]], as_rgb(grey[[0, 0]]), keys=["d", "d"])
    assert len(calls) == 2 * 2
    with pytest.raises(ValueError, match="2 keys for 1 clips"):
        m.update(pred[:1], truth[:1], grey[:1], as_rgb(grey[:1]), keys=["a", "b"])


def test_the_flow_cache_keeps_the_first_samples_within_its_budget(farneback_calls):
    """A budget of 2.5 samples caches the first two keys, at every validation the same two;
    the others are computed afresh each time, with the same metrics as without a cache."""
    calls = farneback_calls
    truth, grey, pred = moving_clips(4)
    chunks = [slice(0, 3), slice(3, 4)]
    fresh = run_metrics(pred, truth, grey, chunks=chunks)
    sample = 2 * 2 * 2 * 48 * 64 * 4  # fwd + bwd, T - 1 = 2 pairs, (u, v), fp32
    m = ColorizationMetrics(flow_cache_bytes=sample * 5 // 2)
    keys = ["a", "b", "c", "d"]
    for validation in range(3):
        calls.clear()
        m.reset()
        for sl in chunks:
            m.update(pred[sl], truth[sl], grey[sl], as_rgb(grey[sl]), keys=keys[sl])
        assert m.compute() == fresh
        assert list(m.flow_cache) == ["a", "b"] and m.flow_cache_used == 2 * sample
        assert len(calls) == (4 if validation == 0 else 2) * 2 * 2  # c and d every time
    for f, b in m.flow_cache.values():  # own storage, not views of the batch's flows
        assert f.untyped_storage().nbytes() + b.untyped_storage().nbytes() == sample
    calls.clear()
    m = ColorizationMetrics(flow_cache_bytes=0)  # no cache at all
    for _ in range(2):
        m.update(pred, truth, grey, as_rgb(grey), keys=keys)
    assert not m.flow_cache and len(calls) == 2 * 4 * 2 * 2


def test_opencv_threads_are_shared_by_the_ranks_of_a_node(monkeypatch):
    import cv2

    from metrics import flow as metrics

    before = cv2.getNumThreads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    metrics._share_cv2_threads.cache_clear()
    try:
        farneback_flows(moving_texture()[1][None])
        assert cv2.getNumThreads() == max(1, len(os.sched_getaffinity(0)) // 2)
        cv2.setNumThreads(before)
        farneback_flows(moving_texture()[1][None])
        assert cv2.getNumThreads() == before  # set once per process, not at every call
    finally:
        cv2.setNumThreads(before)
        metrics._share_cv2_threads.cache_clear()


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
        clips.append((pred, rgb, grey, as_rgb(grey)))
    m = ColorizationMetrics()
    m.update(*(torch.stack(x) for x in zip(*clips[:2])))
    m.update(*(x[None] for x in clips[2]))
    out = m.compute()
    # Per clip: PSNR over all of the clip's frames at once, SSIM the mean over its frames.
    psnr = [peak_signal_noise_ratio(p, t, data_range=1.0).item() for p, t, *_ in clips]
    ssim = [structural_similarity_index_measure(p, t, data_range=1.0).item()
            for p, t, *_ in clips]
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


def test_grey_baseline_gain_and_colourfulness_per_clip():
    """psnr_grey/ssim_grey score the baseline as psnr/ssim score the model; the gain is their
    difference (exactly 0 when the model is the baseline); colourfulness is M averaged over
    each clip's frames, then over clips."""
    g = torch.Generator().manual_seed(4)
    clips = [moving_texture(T=3, H=32, W=40, seed=s) for s in (5, 6)]
    truth = torch.stack([rgb for rgb, _ in clips])
    grey = torch.stack([luma for _, luma in clips])
    pred = (truth + 0.08 * torch.randn(truth.shape, generator=g)).clamp(0, 1)
    out = run_metrics(pred, truth, grey)
    psnr_grey = [peak_signal_noise_ratio(as_rgb(luma), rgb, data_range=1.0).item()
                 for rgb, luma in clips]
    ssim_grey = [structural_similarity_index_measure(as_rgb(luma), rgb, data_range=1.0).item()
                 for rgb, luma in clips]
    assert out["psnr_grey"] == pytest.approx(sum(psnr_grey) / 2, rel=1e-5)
    assert out["ssim_grey"] == pytest.approx(sum(ssim_grey) / 2, rel=1e-5)
    assert out["psnr_gain"] == out["psnr"] - out["psnr_grey"] > 1.0  # the noisy truth wins
    m_pred = [colourfulness(p).mean().item() for p in pred]  # per clip: mean over frames
    assert out["colourfulness"] == pytest.approx(sum(m_pred) / 2, rel=1e-9)
    assert out["colourfulness_truth"] == pytest.approx(
        colourfulness(truth).mean(dim=1).mean().item(), rel=1e-9)
    assert out["colourfulness_truth"] > 10  # a colour texture; grey has M = 0

    same = run_metrics(as_rgb(grey), truth, grey)  # the model *is* the baseline
    assert same["psnr_gain"] == 0.0 and same["psnr"] == same["psnr_grey"]
    assert same["ssim"] == same["ssim_grey"] and same["colourfulness"] == 0.0


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
        m.update(rgb[None], rgb[None], grey, rgb[None])
    with pytest.raises(ValueError, match="baseline"):
        m.update(rgb[None], rgb[None], grey[None], rgb[None, :2])
    with pytest.raises(ValueError, match="T >= 2"):
        m.update(rgb[None, :1], rgb[None, :1], grey[None, :1], rgb[None, :1])


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
            m.update(pred[sl], truth[sl], grey[sl], as_rgb(grey[sl]))
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


# --- colourfulness, CIEDE2000 and whole-video scores (tricolor-eval) ------------------------


# Sharma, Wu & Dalal (2005), Table 1: (L1, a1, b1), (L2, a2, b2), CIEDE2000.
SHARMA = [
    ((50.0000, 2.6772, -79.7751), (50.0000, 0.0000, -82.7485), 2.0425),
    ((50.0000, 3.1571, -77.2803), (50.0000, 0.0000, -82.7485), 2.8615),
    ((50.0000, 2.8361, -74.0200), (50.0000, 0.0000, -82.7485), 3.4412),
    ((50.0000, -1.3802, -84.2814), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -1.1848, -84.8006), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -0.9009, -85.5211), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, 0.0000, 0.0000), (50.0000, -1.0000, 2.0000), 2.3669),
    ((50.0000, -1.0000, 2.0000), (50.0000, 0.0000, 0.0000), 2.3669),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0009), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0010), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0011), 7.2195),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0012), 7.2195),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0009, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0010, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0011, -2.4900), 4.7461),
    ((50.0000, 2.5000, 0.0000), (50.0000, 0.0000, -2.5000), 4.3065),
    ((50.0000, 2.5000, 0.0000), (73.0000, 25.0000, -18.0000), 27.1492),
    ((50.0000, 2.5000, 0.0000), (61.0000, -5.0000, 29.0000), 22.8977),
    ((50.0000, 2.5000, 0.0000), (56.0000, -27.0000, -3.0000), 31.9030),
    ((50.0000, 2.5000, 0.0000), (58.0000, 24.0000, 15.0000), 19.4535),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.1736, 0.5854), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2972, 0.0000), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 1.8634, 0.5757), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2592, 0.3350), 1.0000),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
    ((61.2901, 3.7196, -5.3901), (61.4292, 2.2480, -4.9620), 1.8731),
    ((35.0831, -44.1164, 3.7933), (35.0232, -40.0716, 1.5901), 1.8645),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((36.4612, 47.8580, 18.3852), (36.2715, 50.5065, 21.2231), 1.4146),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
    ((6.7747, -0.2908, -2.4247), (5.8714, -0.0985, -2.2286), 0.6377),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


def lab_image(values) -> torch.Tensor:
    """Lab triplets [N, 3] -> an image [3, 1, N] (one pixel per triplet)."""
    return torch.tensor(values, dtype=torch.float64).T.unsqueeze(1)


def test_ciede2000_matches_sharma_table():
    lab1, lab2 = lab_image([p[0] for p in SHARMA]), lab_image([p[1] for p in SHARMA])
    expected = torch.tensor([p[2] for p in SHARMA], dtype=torch.float64)
    got = ciede2000(lab1, lab2)[0]
    assert torch.allclose(got, expected, atol=5e-5), (got - expected).abs().max()
    assert torch.allclose(ciede2000(lab2, lab1)[0], got, atol=1e-12)  # symmetric
    assert ciede2000(lab1, lab1).abs().max().item() == 0.0


def ciede2000_scalar(lab1, lab2) -> float:
    """A second, scalar transcription of Sharma et al.'s equations (1)-(22), in `math`."""
    (L1, a1, b1), (L2, a2, b2) = lab1, lab2
    c_bar = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(c_bar**7 / (c_bar**7 + 25**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = math.hypot(a1p, b1), math.hypot(a2p, b2)

    def hue(b, ap):
        return 0.0 if b == 0 and ap == 0 else math.degrees(math.atan2(b, ap)) % 360

    h1p, h2p = hue(b1, a1p), hue(b2, a2p)
    if c1p * c2p == 0:
        dhp = 0.0
    elif abs(h2p - h1p) <= 180:
        dhp = h2p - h1p
    elif h2p - h1p > 180:
        dhp = h2p - h1p - 360
    else:
        dhp = h2p - h1p + 360
    dHp = 2 * math.sqrt(c1p * c2p) * math.sin(math.radians(dhp / 2))
    Lp, Cp = (L1 + L2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        hp = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        hp = (h1p + h2p) / 2
    elif h1p + h2p < 360:
        hp = (h1p + h2p + 360) / 2
    else:
        hp = (h1p + h2p - 360) / 2
    T = (1 - 0.17 * math.cos(math.radians(hp - 30)) + 0.24 * math.cos(math.radians(2 * hp))
         + 0.32 * math.cos(math.radians(3 * hp + 6)) - 0.20 * math.cos(math.radians(4 * hp - 63)))
    dtheta = 30 * math.exp(-(((hp - 275) / 25) ** 2))
    Rc = 2 * math.sqrt(Cp**7 / (Cp**7 + 25**7))
    Sl = 1 + 0.015 * (Lp - 50) ** 2 / math.sqrt(20 + (Lp - 50) ** 2)
    Sc, Sh = 1 + 0.045 * Cp, 1 + 0.015 * Cp * T
    Rt = -math.sin(math.radians(2 * dtheta)) * Rc
    dl, dc, dh = (L2 - L1) / Sl, (c2p - c1p) / Sc, dHp / Sh
    return math.sqrt(dl**2 + dc**2 + dh**2 + Rt * dc * dh)


def test_ciede2000_scalar_reference_on_sharma_and_random_pairs():
    for lab1, lab2, expected in SHARMA:  # the reference itself is right...
        assert ciede2000_scalar(lab1, lab2) == pytest.approx(expected, abs=5e-5)
    g = torch.Generator().manual_seed(3)  # ...and agrees with the tensor version anywhere
    lab = torch.rand(2, 200, 3, generator=g, dtype=torch.float64)
    lab = lab * torch.tensor([100.0, 220.0, 220.0], dtype=torch.float64) - torch.tensor(
        [0.0, 110.0, 110.0], dtype=torch.float64)
    got = ciede2000(lab_image(lab[0].tolist()), lab_image(lab[1].tolist()))[0]
    ref = [ciede2000_scalar(p, q) for p, q in zip(lab[0].tolist(), lab[1].tolist())]
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-9)


def test_mean_ciede2000_of_rgb_images():
    rgb, _ = moving_texture(T=2, H=8, W=10)
    assert mean_ciede2000(rgb, rgb).abs().max().item() == 0.0
    lab = rgb_to_cielab(rgb).double()
    ref = [sum(ciede2000_scalar(lab[0, :, y, x].tolist(), lab[1, :, y, x].tolist())
               for y in range(8) for x in range(10)) / 80]
    assert mean_ciede2000(rgb[:1], rgb[1:]).item() == pytest.approx(ref[0], rel=1e-6)


def test_colourfulness_by_hand():
    # Half the pixels pure red, half pure blue: rg = 255 | 0, yb = 127.5 | -255.
    img = torch.zeros(3, 2, 2)
    img[0, 0], img[2, 1] = 1.0, 1.0
    sigma = math.sqrt(127.5**2 + 191.25**2)  # std(rg) = 127.5, std(yb) = 191.25
    mu = math.sqrt(127.5**2 + 63.75**2)  # mean(rg) = 127.5, mean(yb) = -63.75
    assert colourfulness(img).item() == pytest.approx(sigma + 0.3 * mu, rel=1e-12)
    grey = torch.rand(1, 5, 7).expand(3, -1, -1)
    assert colourfulness(grey).item() == pytest.approx(0.0, abs=1e-9)
    # Random images, batched, against numpy.
    imgs = torch.rand(4, 3, 6, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for img, got in zip(imgs, colourfulness(imgs)):
        R, G, B = (img.numpy() * 255)
        rg, yb = R - G, (R + G) / 2 - B
        expected = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
        assert got.item() == pytest.approx(expected, rel=1e-12)


def test_cdc_of_two_alternating_frames_is_their_js_divergence():
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(2, 3, 16, 20, generator=g)
    pa, pb = histograms(a), histograms(b)
    js = js_divergence(pa, pb).mean().item()  # mean over the three channels
    # Independent reference for the JS of the histograms (numpy, natural log).
    def kl(x, m):
        return np.sum(x[x > 0] * np.log(x[x > 0] / m[x > 0]))

    ref = []
    for c in range(3):
        p = np.bincount(np.round(a[c].numpy() * 255).astype(int).ravel(), minlength=256) / 320
        q = np.bincount(np.round(b[c].numpy() * 255).astype(int).ravel(), minlength=256) / 320
        m = (p + q) / 2
        ref.append((kl(p, m) + kl(q, m)) / 2)
    assert js == pytest.approx(np.mean(ref), rel=1e-5)
    assert clip_cdc(torch.stack([a, b])[None]).item() == pytest.approx(js, rel=1e-6)
    # a, b, a, b, ... : dilation 1 pairs differ, dilations 2 and 4 pair equal frames.
    alternating = torch.stack([a, b] * 4)  # T = 8
    assert clip_cdc(alternating[None]).item() == pytest.approx(js / 3, rel=1e-6)
    scores = VideoScores(["static"])  # the streaming version, against a constant output
    for f in alternating:
        scores.update(f, f.mean(dim=0, keepdim=True), {"static": a})
    out = scores.compute()["static"]
    assert out["cdc_truth"] == pytest.approx(js / 3, rel=1e-6)
    assert out["cdc"] == 0.0


def test_video_scores_equal_the_clip_metrics_of_the_whole_video():
    """Streaming, frame by frame, gives what the clip functions give on the whole video."""
    truth, grey = moving_texture(T=6, H=32, W=40, shift=2, seed=4)
    g = torch.Generator().manual_seed(9)
    preds = {"noisy": (truth + 0.05 * torch.randn(truth.shape, generator=g)).clamp(0, 1),
             "flicker": torch.stack([truth[t].roll(t, dims=0) for t in range(6)])}
    scores = VideoScores(list(preds))
    for t in range(6):
        scores.update(truth[t], grey[t], {k: v[t] for k, v in preds.items()})
    out = scores.compute()
    fwd, bwd = farneback_flows(grey[None])
    mask = non_occlusion_mask(fwd[0], bwd[0])[None]
    warp_truth, valid = clip_warp_error(truth[None], fwd, mask)
    assert valid.item()
    for name, video in preds.items():
        got = out[name]
        assert got["psnr"] == pytest.approx(clip_psnr(video[None], truth[None]).item(), rel=1e-5)
        assert got["ssim"] == pytest.approx(clip_ssim(video[None], truth[None]).item(), rel=1e-5)
        assert got["cdc"] == pytest.approx(clip_cdc(video[None]).item(), rel=1e-5)
        assert got["cdc_truth"] == pytest.approx(clip_cdc(truth[None]).item(), rel=1e-5)
        warp, _ = clip_warp_error(video[None], fwd, mask)
        assert got["warp"] == pytest.approx(warp.item(), rel=1e-5)
        assert got["warp_truth"] == pytest.approx(warp_truth.item(), rel=1e-5)
        assert got["warp_excess"] == pytest.approx(got["warp"] - got["warp_truth"])
        m, m_truth = colourfulness(video).mean().item(), colourfulness(truth).mean().item()
        assert got["colourfulness"] == pytest.approx(m, rel=1e-9)
        assert got["colourfulness_diff"] == pytest.approx(abs(m - m_truth), rel=1e-9)
        assert got["ciede2000"] == pytest.approx(mean_ciede2000(video, truth).mean().item(),
                                                 rel=1e-9)
    assert out["flicker"]["warp_excess"] > 10 * abs(out["noisy"]["warp_excess"])


def test_video_scores_of_the_truth_itself():
    truth, grey = moving_texture(T=3, H=24, W=32)
    scores = VideoScores(["same"])
    for t in range(3):
        scores.update(truth[t], grey[t], {"same": truth[t]})
    out = scores.compute()["same"]
    assert out["psnr"] == PSNR_CAP_DB and out["ssim"] == pytest.approx(1.0)
    assert out["ciede2000"] == 0.0 and out["colourfulness_diff"] == 0.0
    assert out["cdc"] == out["cdc_truth"] and out["warp_excess"] == 0.0
    with pytest.raises(ValueError, match="expected predictions"):
        scores.update(truth[0], grey[0], {"other": truth[0]})
