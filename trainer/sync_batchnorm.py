"""BatchNorm with statistics over all ranks: one all_reduce per call, no host sync, CPU or GPU.

`torch.nn.SyncBatchNorm` all-gathers per-rank statistics and then filters out empty ranks with
`count_all[mask]`, a boolean index that blocks the host until the GPU catches up: 14 host syncs
per step in our generator. It also refuses CPU tensors, so
CPU ranks would normalize per rank. `SyncBatchNorm2d` instead all-reduces one small stacked
tensor per call and never reads a value on the host.

Contract: every rank's batch is non-empty (the loaders drop or pad the last batch, so every
rank has the same batch shape). Counts are reduced with the sums, so unequal batch sizes would
still be weighted correctly, but an empty batch would make that rank's mean NaN and with it the
global statistics, where torch's SyncBatchNorm would skip the rank.

Numerics: each rank takes its mean and (biased) variance with `torch.var_mean` in fp32, which
is numerically stable (Welford / two-pass), not E[x^2] - E[x]^2. The ranks then all-reduce, in
float64, n*mean and n*(var + mean^2) per channel and n. The global variance
sum(n*(var + mean^2))/N - mean^2 only cancels the spread of the per-rank means, at float64
precision: about 1e-16 * mean^2 against the variance, where the same formula on fp32 sums of x
and x^2 would lose 1e-7 * mean^2 (a channel with mean 1000 and std 1 would get a variance off
by ~0.1). The result is clamped at 0 against rounding, then used in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks. The loss is the sum of every rank's loss, so the gradient
    of each rank's input is the sum of the ranks' output gradients: another all_reduce.
    (torch.distributed.nn.functional.all_reduce does this too, but is deprecated and warns on
    every call.)"""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training-mode statistics are those of the batch of all ranks
    (the default process group). It adds no parameters or buffers: its state_dict is a
    BatchNorm2d's, and loads into one. In eval mode, or without a process group of 2+ ranks,
    it is exactly `nn.BatchNorm2d`. Every rank must call it (in training mode), as with any
    collective."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        with torch.autocast(x.device.type, enabled=False):  # statistics in fp32, also under bf16
            x32 = x.float()
            var, mean = torch.var_mean(x32, dim=(0, 2, 3), correction=0)
            n = x32.numel() // x32.shape[1]  # from the shape: no sync
            mean64 = mean.double()
            local = torch.stack([n * mean64, n * (var.double() + mean64.square()),
                                 torch.full_like(mean64, n)])
            total = _AllReduceSum.apply(local)  # [3, C]: sum, sum of squares, count
            count = total[2]
            mean64 = total[0] / count
            var64 = (total[1] / count - mean64.square()).clamp(min=0)
            mean, var = mean64.float(), var64.float()
            scale = torch.rsqrt(var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight.float()
            shift = -mean * scale
            if self.bias is not None:
                shift = shift + self.bias.float()
            y = x32 * scale[:, None, None] + shift[:, None, None]
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), (var64 * count / (count - 1)).detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """As BatchNorm: an exponential average with `momentum`, or the cumulative average
        when momentum is None (a tensor weight: no host read of num_batches_tracked)."""
        self.num_batches_tracked.add_(1)
        f = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
        self.running_mean.copy_(self.running_mean * (1 - f) + mean * f)
        self.running_var.copy_(self.running_var * (1 - f) + unbiased_var.float() * f)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every `nn.BatchNorm2d` in `module` (itself included) becomes a `SyncBatchNorm2d`; other
    norms are left alone. The subclass has no state of its own, so the class is swapped in
    place: the very same parameters and buffers stay (device, dtype, memory format, and any
    optimizer or EMA already holding them). Returns `module`."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return module
