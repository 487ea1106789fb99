"""Where a run reports: TensorBoard (`tb/`) and `metrics.jsonl`, from the main process only.

Other ranks get a logger whose methods do nothing, so the loop calls it unconditionally;
collectives that feed it (metric sync, `Window.reduce`) still run on every rank before.
`Window` holds what the steps reported between two logs, on the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = SummaryWriter(str(run_dir / "tb")) if enabled else None
        self.jsonl = run_dir / "metrics.jsonl"

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """`grid`: RGB [3, H, W] in [0, 1]."""
        if self.enabled:
            self.writer.add_image(tag, grid.clamp(0, 1), step)

    def evaluation(self, metrics: dict[str, float], step: int, split: str = "val") -> None:
        self.scalars({f"Metrics/{split}/{k}": v for k, v in metrics.items()}, step)
        if self.enabled:
            record = {"step": step, "split": split, "time": time.time(), **metrics}
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


# Reported by every step (trainer/step.py): 1.0 when that phase's update was skipped (a
# non-finite loss or gradients on some rank, agreed across ranks), or the fp16 scaler skipped.
SKIP_FLAGS = ("Skipped/G", "Skipped/D", "Skipped/fp16_overflow")


class Window:
    """What the steps since the last log reported, kept on the device.

    `add` sums each step's 0-dim tensors (losses, norms, skip flags) and counts skipped steps
    and the current run of consecutive ones (a step is skipped when its G or D update was)
    without reading anything back: a `.item()` per step would stall the GPU queue every step.
    At a log step `reduce` averages the window across ranks as ONE stacked tensor (one
    all_reduce, one `.tolist()`); between logs `skips` reads the skip counters alone
    (checkpoint and stop steps, where `skipped_total` is saved). The skip decisions are agreed
    across ranks, so every rank counts the same."""

    def __init__(self, device: torch.device):
        self.zero = torch.zeros((), device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # steps that reported each key (Grad/*: boundaries)
        self.steps = 0
        self.streak = self.zero  # consecutive skipped steps up to now (carried across windows)
        self._reset_skips()

    def _reset_skips(self) -> None:
        self.skipped = self.zero  # skipped steps since the counters were last read
        self.longest = self.zero  # the longest streak since then

    def add(self, out: dict[str, torch.Tensor]) -> None:
        out = {**dict.fromkeys(SKIP_FLAGS, self.zero), **out}  # a step may leave out zeros
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, self.zero) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1
        skipped = torch.maximum(out["Skipped/G"], out["Skipped/D"]).detach().float()
        self.streak = (self.streak + 1) * skipped
        self.longest = torch.maximum(self.longest, self.streak)
        self.skipped = self.skipped + skipped
        self.steps += 1

    def reduce(self, accelerator, extra: dict[str, torch.Tensor]) -> tuple[dict, int, int]:
        """(the window's means over the steps that reported each key, averaged across ranks,
        with `extra`'s values; skipped steps; longest skip streak), then a new window. A
        collective: every rank calls it at the same step, and the keys are the same on every
        rank (they depend on the config and the accumulation boundary only)."""
        names = sorted(self.sums)
        means = [self.sums[k] / self.counts[k] for k in names]
        stacked = torch.stack([*means, *(v.detach().float() for v in extra.values()),
                               self.skipped, self.longest])
        *values, skipped, longest = accelerator.reduce(stacked, "mean").tolist()
        self.sums, self.counts, self.steps = {}, {}, 0
        self._reset_skips()
        return dict(zip([*names, *extra], values)), round(skipped), round(longest)

    def skips(self) -> tuple[int, int]:
        """(skipped steps, longest skip streak) since they were last read: one `.tolist()`,
        no collective (the counts are the same on every rank)."""
        skipped, longest = torch.stack([self.skipped, self.longest]).tolist()
        self._reset_skips()
        return round(skipped), round(longest)
