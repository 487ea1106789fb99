"""Where a run reports: TensorBoard (`tb/`) and `metrics.jsonl`, from the main process only.

Other ranks get a logger whose methods do nothing, so the loop calls it unconditionally;
collectives that feed it (metric sync) still run on every rank before.
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
