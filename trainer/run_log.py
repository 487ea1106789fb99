"""Where a run reports: TensorBoard (`tb/`) and `metrics.jsonl`, from the main process only.

Other ranks get a logger whose methods do nothing, so the loop calls it unconditionally;
collectives that feed it (metric sync, `Window.reduce`) still run on every rank before.
`Window` holds what the steps reported between two logs, on the device; `validation_table`
is the final validation as the main process prints it.
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


class Window:
    """What the steps since the last log reported, kept on the device.

    `add` sums each step's 0-dim tensors (losses, norms, skip flags) and counts skipped
    updates and the current run of consecutive ones without reading anything back: a
    `.item()` per step would stall the GPU queue every step. A skipped update is an optimizer
    step (of G or D, or both) that was skipped: with train.grad_accum > 1 on DDP that is one
    per accumulation window, so `skipped` and the streak count windows, not batches
    (DeepSpeed may also report a skipped micro-batch between boundaries; it counts as one).
    At a log step `reduce` averages the window across ranks as ONE stacked tensor (one
    all_reduce, one `.tolist()`); between logs `skips` reads the skip counters alone
    (checkpoint and stop steps, where `skipped_total` is saved). The skip decisions are agreed
    across ranks, so every rank counts the same."""

    def __init__(self, device: torch.device):
        self.zero = torch.zeros((), device=device)
        self.sums: dict[str, torch.Tensor] = {}
        # steps that reported each key; Grad/*: a device count of the finite values only
        self.counts: dict[str, int | torch.Tensor] = {}
        self.steps = 0
        self.streak = self.zero  # consecutive skipped updates up to now (across windows)
        self._reset_skips()

    def _reset_skips(self) -> None:
        self.skipped = self.zero  # skipped updates since the counters were last read
        self.longest = self.zero  # the longest streak since then

    def add(self, out: dict[str, torch.Tensor], boundary: bool) -> None:
        """One batch's report (`train_step`'s, which always holds `Skipped/G` and `Skipped/D`:
        1.0 where that update was skipped). `boundary`: the batch ended an accumulation window (the
        optimizers stepped: `accelerator.sync_gradients`); only there can an update succeed
        and end a streak. Between boundaries DDP reports nothing skipped (its decision is at
        the boundary) and DeepSpeed may report a skipped micro-batch: the streak only grows."""
        for k, v in out.items():
            v = v.detach().float()
            if k.startswith("Grad/"):
                # The norm of a skipped update is inf or NaN: left out (on the device), so
                # that one skip does not make the window's mean NaN. A window without a
                # finite norm gives 0 / 0 = NaN: not measured.
                finite = torch.isfinite(v)
                v = torch.where(finite, v, self.zero)
                self.counts[k] = self.counts.get(k, self.zero) + finite.float()
            else:
                self.counts[k] = self.counts.get(k, 0) + 1
            self.sums[k] = self.sums.get(k, self.zero) + v
        skipped = torch.maximum(out["Skipped/G"], out["Skipped/D"]).detach().float()
        if boundary:
            self.streak = (self.streak + 1) * skipped
        else:
            self.streak = self.streak + skipped
        self.longest = torch.maximum(self.longest, self.streak)
        self.skipped = self.skipped + skipped
        self.steps += 1

    def reduce(self, accelerator, extra: dict[str, torch.Tensor]) -> tuple[dict, int, int]:
        """(the window's means over the steps that reported each key (Grad/*: over its finite
        values), averaged across ranks, with `extra`'s values; skipped updates; longest run of
        consecutive skipped updates), then a new window. A
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
        """(skipped updates, longest run of them) since they were last read: one `.tolist()`,
        no collective (the counts are the same on every rank)."""
        skipped, longest = torch.stack([self.skipped, self.longest]).tolist()
        self._reset_skips()
        return round(skipped), round(longest)


def validation_table(metrics: dict[str, float]) -> str:
    """The final validation as a small table: the model beside zero chroma (the grey frame
    itself) and the gain over it, and where there is one the ground truth's own value (the
    floor of cdc and warp: real video is not perfectly consistent either)."""
    columns = ("model", "grey", "gain", "truth")
    lines = ["validation (EMA generator, val split)",
             f"{'metric':<14}" + "".join(f"{c:>10}" for c in columns)]
    derived = ("_truth", "_grey", "_gain", "_excess")
    for name, value in metrics.items():
        if name.endswith(derived):
            continue
        grey, truth = metrics.get(f"{name}_grey"), metrics.get(f"{name}_truth")
        gain = value - grey if grey is not None else None
        cells = [value, grey, gain, truth]
        lines.append(f"{name:<14}" + "".join(
            f"{'':>10}" if v is None else f"{v:>+10.4g}" if c == "gain" else f"{v:>10.4g}"
            for c, v in zip(columns, cells)))
    lines.append("centre crops of the val split; grey: zero chroma (the grey frame itself, "
                 "a = b = 0); truth: the ground truth's own value, the floor of cdc and warp")
    return "\n".join(lines)
