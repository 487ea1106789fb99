"""Validation's metrics, reduced across ranks by torchmetrics (conventions: metrics/__init__.py)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.clip import clip_cdc, clip_psnr, clip_ssim, colourfulness
from metrics.flow import (
    clip_warp_error,
    farneback_flows,
    non_occlusion_mask,
    stored_warp_error,
)

# Host memory that one ColorizationMetrics may hold in cached Farnebäck flows (per process, so
# per rank): 32 H W bytes per triplet (7.4 MB at 480^2), so 1 GiB holds ~145 such samples. Once
# full, the flows of further samples are computed at every validation and not kept; the samples
# cached are the first ones seen (the val loader's order is fixed), the same at every validation.
FLOW_CACHE_BYTES = 1 << 30


class ColorizationMetrics(Metric):
    """PSNR, SSIM, CDC and warp error of colorized clips, with the ground-truth floors.

    `update(pred, truth, grey, baseline)`: pred, truth and baseline are RGB in [0, 1],
    [B, T, 3, H, W], each batch item T consecutive frames of one clip (T >= 2); grey
    [B, T, 1, H, W] in [0, 1] is the greyscale input, from which the flow is computed;
    baseline is the reference colorization the model is compared with (zero chroma).
    `compute()` (synced across ranks by torchmetrics) returns floats: psnr (dB), psnr_grey,
    psnr_gain, ssim, ssim_grey, cdc, cdc_truth, warp, warp_truth, warp_excess, colourfulness,
    colourfulness_truth; the means over clips described in the module docstring (NaN with no
    clips).

    Farnebäck flow (when no stored flow is given) is computed on the CPU, the slow part of a
    validation at large crops. Given `keys` (the batch's
    sample keys), the flows of each sample are computed once and kept, on the host, for later
    updates and validations: they depend only on the sample's grey frames, which are the same
    at every validation (centre crop, no flip or jitter: trainer/validate.py). A sample costs
    16 (T-1) H W bytes, 7.4 MB for a 480^2 triplet; the cache holds at most `flow_cache_bytes`
    (default `FLOW_CACHE_BYTES`) of them, first come first kept: once full, the flows of
    further samples are computed at every update and dropped. `reset()` keeps the cache.
    """

    is_differentiable = False
    higher_is_better = None  # mixed: psnr/ssim up, the rest down
    full_state_update = False

    SUMS = ("psnr", "psnr_grey", "ssim", "ssim_grey", "cdc", "cdc_truth", "warp", "warp_truth",
            "colourfulness", "colourfulness_truth")

    def __init__(self, flow_cache_bytes: int = FLOW_CACHE_BYTES, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self.SUMS:
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.add_state("clips", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("warp_clips", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.flow_cache: dict[str, tuple[Tensor, Tensor]] = {}  # key -> CPU (fwd, bwd)
        self.flow_cache_bytes = flow_cache_bytes  # the budget
        self.flow_cache_used = 0  # bytes held in flow_cache

    def update(self, pred: Tensor, truth: Tensor, grey: Tensor, baseline: Tensor,
               flow: tuple[Tensor, Tensor] | None = None, keys: list[str] | None = None) -> None:
        """`flow`: (flow, mask) stored in the shards for these triplets (`Batch.flow`,
        `Batch.flow_mask`): the warp error uses them (`stored_warp_error`) instead of
        computing Farnebäck flow on the CPU. `keys`: one per clip, naming clips whose grey
        frames are the same whenever the key comes again (`Batch.keys` in validation): their
        Farnebäck flows are cached; None computes them afresh."""
        if pred.ndim != 5 or pred.shape[2] != 3 or not pred.shape == truth.shape == baseline.shape:
            raise ValueError(f"pred, truth and baseline must all be RGB [B, T, 3, H, W]; got "
                             f"{tuple(pred.shape)}, {tuple(truth.shape)} and "
                             f"{tuple(baseline.shape)}")
        if grey.shape != (*pred.shape[:2], 1, *pred.shape[3:]):
            raise ValueError(f"grey must be [B, T, 1, H, W] matching pred {tuple(pred.shape)}; "
                             f"got {tuple(grey.shape)}")
        if pred.shape[1] < 2:
            raise ValueError(f"temporal metrics need clips of T >= 2 frames; got T = "
                             f"{pred.shape[1]}")
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, truth, grey, baseline = (x.float() for x in (pred, truth, grey, baseline))
            if flow is not None and pred.shape[1] == 3:
                warp_pred, valid = stored_warp_error(pred, *flow)
                warp_truth, _ = stored_warp_error(truth, *flow)
            else:
                fwd, bwd = self.cached_flows(grey, keys)
                mask = non_occlusion_mask(fwd.flatten(0, 1), bwd.flatten(0, 1))
                mask = mask.view(*fwd.shape[:2], *mask.shape[-2:])
                warp_pred, valid = clip_warp_error(pred, fwd, mask)
                warp_truth, _ = clip_warp_error(truth, fwd, mask)  # same masks and validity
            per_clip = {"psnr": clip_psnr(pred, truth), "ssim": clip_ssim(pred, truth),
                        "psnr_grey": clip_psnr(baseline, truth),
                        "ssim_grey": clip_ssim(baseline, truth),
                        "cdc": clip_cdc(pred), "cdc_truth": clip_cdc(truth),
                        "warp": warp_pred * valid, "warp_truth": warp_truth * valid,
                        "colourfulness": colourfulness(pred).mean(dim=1),
                        "colourfulness_truth": colourfulness(truth).mean(dim=1)}
        for name, values in per_clip.items():
            state = getattr(self, f"{name}_sum")
            setattr(self, f"{name}_sum", state + values.sum().to(state))
        self.clips += pred.shape[0]
        self.warp_clips += valid.sum().to(self.warp_clips)

    def cached_flows(self, grey: Tensor, keys: list[str] | None) -> tuple[Tensor, Tensor]:
        """`farneback_flows(grey)`, computed only for the keys not in the cache; those computed
        are cached while the budget allows (in batch order)."""
        if keys is None:
            return farneback_flows(grey)
        if len(keys) != grey.shape[0]:
            raise ValueError(f"{len(keys)} keys for {grey.shape[0]} clips")
        new = [i for i, key in enumerate(keys)  # a padded batch may repeat a key
               if key not in self.flow_cache and key not in keys[:i]]
        computed: dict[str, tuple[Tensor, Tensor]] = {}
        if new:
            fwd, bwd = farneback_flows(grey[new], device=torch.device("cpu"))
            for i, f, b in zip(new, fwd, bwd, strict=True):
                size = f.nbytes + b.nbytes
                if self.flow_cache_used + size <= self.flow_cache_bytes:
                    # clones: views would keep the whole batch's flows alive
                    self.flow_cache[keys[i]] = (f.clone(), b.clone())
                    self.flow_cache_used += size
                else:
                    computed[keys[i]] = (f, b)
        flows = [self.flow_cache[key] if key in self.flow_cache else computed[key]
                 for key in keys]
        fwd, bwd = (torch.stack(x).to(grey.device) for x in zip(*flows, strict=True))
        return fwd, bwd

    def compute(self) -> dict[str, float]:
        mean = {}
        for name in self.SUMS:
            count = self.warp_clips if name.startswith("warp") else self.clips
            mean[name] = (getattr(self, f"{name}_sum") / count).item()
        derived = {"psnr_gain": mean["psnr"] - mean["psnr_grey"],
                   "warp_excess": mean["warp"] - mean["warp_truth"]}
        order = ("psnr", "psnr_grey", "psnr_gain", "ssim", "ssim_grey", "cdc", "cdc_truth",
                 "warp", "warp_truth", "warp_excess", "colourfulness", "colourfulness_truth")
        return {name: (mean | derived)[name] for name in order}
