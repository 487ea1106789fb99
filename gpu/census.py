"""The census stages of `make gpu-check`: host syncs of the loader's GPU transform, of
`train_step` and of the stop agreement, counted under torch's sync debug mode (CUDA only: on
the CPU it counts nothing)."""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections import Counter
from pathlib import Path

from gpu.context import DEMO, ROOT, Context

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch's sync-debug warning


def count_sync_warnings(records) -> tuple[int, Counter]:
    """(how many of these `warnings.catch_warnings(record=True)` records are torch's sync
    debug warnings, and where they came from: "file:line" of the Python caller)."""
    sites: Counter = Counter()
    for r in records:
        if SYNC_MESSAGE in str(r.message):
            path = Path(r.filename)
            with contextlib.suppress(ValueError):
                path = path.resolve().relative_to(ROOT)
            sites[f"{path}:{r.lineno}"] += 1
    return sum(sites.values()), sites


class SyncCensus:
    """Counts host syncs in a block: `with census.count() as n: ...; n[0]` is how many.
    On CUDA it turns torch's sync debug mode to "warn" for the block; all sites are summed
    in `self.sites`."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.sites: Counter = Counter()

    @contextlib.contextmanager
    def count(self):
        import torch

        result = [0]
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
        result[0], sites = count_sync_warnings(records)
        self.sites.update(sites)


def census(ctx: Context, precision: str) -> dict:
    """host syncs of `condition_and_target` (the loader's GPU transform), `train_step` and the
    stop agreement, per step, in grey and line-art mode, at world 1 (no SyncBatchNorm)."""
    import torch
    from accelerate import Accelerator

    from tests.videos import textured_frames  # numpy only: PyAV is imported where it encodes
    from trainer.config import load_config
    from trainer.data import Batch
    from trainer.data.transforms import condition_and_target
    from trainer.step import train_step
    from trainer.stop import StopRequest
    from trainer.train import build_gan

    cuda = ctx.device == "cuda"
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              cpu=not cuda)
    device = accelerator.device
    crop, batch_size, steps = (32, 2, 2) if ctx.tiny else (256, 8, 6)
    figures: dict = {"crop": crop, "batch": batch_size, "steps": steps}
    for mode in ("grey", "lineart"):
        cfg = load_config(DEMO, [f"data.shards={ctx.shards / 'small'}", f"model.mode={mode}",
                                 f"data.crop_size={crop}", f"data.batch_size={batch_size}"])
        torch.manual_seed(0)
        gan = build_gan(cfg, accelerator)
        counter = SyncCensus(cuda)
        frames = torch.stack([torch.from_numpy(x.copy()) for x in textured_frames(
            3 * batch_size, crop, crop, seed=1)]).reshape(batch_size, 3, crop, crop, 3)
        frames = frames.to(device)  # uploaded outside the census: DALI gives device tensors
        transform, step_syncs = [], []
        stop = StopRequest(None)
        try:
            for i in range(steps):
                with counter.count() as n:
                    cond, target = condition_and_target(frames, mode,
                                                        cfg.data.canny_low, cfg.data.canny_high)
                transform.append(n[0])
                with counter.count() as n:
                    train_step(accelerator, gan, Batch(cond, target, []), i)
                step_syncs.append(n[0])
            with counter.count() as n:
                stop.agreed(device)
            stop_syncs = n[0]
        finally:
            stop.close()
        if cuda:
            torch.cuda.synchronize()
        figures[mode] = {
            "transform_syncs_per_batch": transform,
            "train_step_syncs_per_step": step_syncs,
            "train_step_syncs_median_after_first": statistics.median(step_syncs[1:] or
                                                                     step_syncs),
            "stop_agreed_syncs": stop_syncs,
            "sites": dict(counter.sites.most_common(12)),
        }
        ctx.check(f"{mode}: steps ran", len(step_syncs) == steps, step_syncs)
        del gan
    return figures

