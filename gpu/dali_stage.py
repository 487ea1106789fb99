"""The dali stage of `make gpu-check`: mixed (nvJPEG) against CPU decoding, the DALI checkpoint
restored in a new loader, and throughput at the training shape. Skipped without DALI."""

from __future__ import annotations

import time
from pathlib import Path

from gpu.context import DEMO, Context, Skip, endless


def _dali_cfg(shards: Path, crop: int, batch: int, threads: int, backend: str = "dali",
              jitter: float = 0.0):
    from trainer.config import load_config

    return load_config(DEMO, [
        f"data.shards={shards}", f"data.backend={backend}", f"data.crop_size={crop}",
        f"data.batch_size={batch}", f"data.num_threads={threads}",
        f"data.brightness_jitter={jitter}"]).data


def _first_frames(cfg, device, augment: bool):
    import torch

    from trainer.data import TripletLoader

    loader = TripletLoader(cfg, "grey", "train", 0, 1, torch.device(device), seed=0,
                           shuffle=augment, augment=augment)
    source = loader._make_source()  # DALI or webdataset, as data.backend says
    frames, keys, _ = source.next()
    return frames, keys, source


def dali(ctx: Context) -> dict:
    import torch

    from bench.common import sync, torch_device
    from trainer.data import TripletLoader, dali_available

    if not dali_available():
        raise Skip("DALI absent (nvidia-dali-cuda130 not installed: see docs/gpu-check.md)")
    import nvidia.dali

    large = ctx.shards / "large"
    crop, batch = (64, 4) if ctx.tiny else (480, 8)
    figures: dict = {"dali": nvidia.dali.__version__, "crop": crop, "batch": batch}

    # 1. mixed (GPU) decoding against the CPU pipeline: centre crops, then augmented with
    # the same seed (the random draws are CPU operators: the same crops, flips and gains).
    for augment in (False, True):
        cfg = _dali_cfg(large, crop, batch, 2, jitter=0.2 if augment else 0.0)
        gpu, gkeys, source = _first_frames(cfg, ctx.device, augment)
        cpu, ckeys, _ = _first_frames(cfg, "cpu", augment)
        label = "augmented" if augment else "centre"
        ctx.check(f"{label}: mixed output is uint8 [B,3,H,W,3] on {ctx.device}",
                  gpu.dtype == torch.uint8 and tuple(gpu.shape) == (batch, 3, crop, crop, 3)
                  and gpu.device.type == ctx.device, f"{gpu.dtype} {tuple(gpu.shape)} "
                  f"{gpu.device}")
        ctx.check(f"{label}: same samples", gkeys == ckeys, f"{gkeys[:3]} vs {ckeys[:3]}")
        delta = (gpu.cpu().int() - cpu.cpu().int()).abs()
        figures[f"{label}_max_abs_diff"] = int(delta.max())
        figures[f"{label}_mean_abs_diff"] = round(float(delta.float().mean()), 4)
        ctx.check(f"{label}: mixed vs cpu decode |d| <= 3", int(delta.max()) <= 3, int(delta.max()))
        if not augment:
            figures["exec_dynamic"] = str(getattr(source.pipe, "exec_dynamic", "unknown"))
            wcfg = _dali_cfg(large, crop, batch, 2, backend="webdataset")
            wds, _, _ = _first_frames(wcfg, "cpu", False)
            figures["centre_vs_webdataset_max_abs_diff"] = int(
                (gpu.cpu().int() - wds.int()).abs().max())
        del source

    # 2. DALI checkpoint on the GPU: the position after 2 batches, restored in a new loader.
    ccrop, cbatch = (32, 2) if ctx.tiny else (128, 4)
    cfg = _dali_cfg(large, ccrop, cbatch, 2)

    def loader():
        return TripletLoader(cfg, "grey", "train", 0, 1, torch.device(ctx.device), seed=3)

    first = loader()
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(2)]
    second = loader()
    second.load_state_dict(state)
    resumed = list(zip(range(2), iter(second)))
    same_keys = [b.keys for b in expected] == [b.keys for _, b in resumed]
    diff = max(float((a.cond - b.cond).abs().max()) for a, (_, b) in zip(expected, resumed))
    ctx.check("checkpoint: the same next samples after restore", same_keys,
              f"{[b.keys for b in expected]} vs {[b.keys for _, b in resumed]}")
    ctx.check("checkpoint: the same pixels (|d cond| <= 1e-3)", diff <= 1e-3, diff)
    figures["checkpoint_max_abs_diff_cond"] = diff
    del first, second

    # 3. throughput at the training shape through TripletLoader (decode + Lab on the device).
    n = 6 if ctx.tiny else 50
    for threads in (2, 8):
        cfg = _dali_cfg(large, crop, batch, threads, jitter=0.1)
        tl = TripletLoader(cfg, "grey", "train", 0, 1, torch.device(ctx.device), seed=0)
        stream = endless(tl)
        for _ in range(3):
            next(stream)
        sync(torch_device(ctx.device))
        t0 = time.perf_counter()
        for _ in range(n):
            next(stream)
        sync(torch_device(ctx.device))
        dt = time.perf_counter() - t0
        figures[f"threads{threads}_batches_per_s"] = round(n / dt, 2)
        figures[f"threads{threads}_triplets_per_s"] = round(n * batch / dt, 1)
        del tl, stream
    figures["throughput_note"] = (f"{n} batches after 3 warm-up, synthetic {crop}-crop JPEG "
                                  "triplets, epochs of few batches (pipeline reset included)")
    return figures

