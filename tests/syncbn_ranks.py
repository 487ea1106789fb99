"""Run with 2 CPU ranks on gloo by tests/test_sync_batchnorm.py (`accelerate launch`).

Every rank builds the same full batch and, as the reference, runs plain `nn.BatchNorm2d` on all
of it in one process; then each rank runs `SyncBatchNorm2d` on its half. Writes report-<rank>.pt
with both sides (the test compares them): outputs, input gradients, weight/bias gradients summed
over ranks (DDP's all_reduce, before its division by the world size), running statistics, the
host reads (`.item()`, `bool()`, ...) counted during the synced forward/backward, a bf16
autocast run, a channel with mean 1e4 and std 1, and the generator with model.norm=batch.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models import ModelConfig, Norm, build_generator
from trainer.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same data and weights on every rank
report = {}


def halves(x: torch.Tensor) -> torch.Tensor:
    return x.chunk(world)[rank]


def summed(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad


class HostReads:
    """Counts the Python-level ways to read a tensor's value on the host."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")

    def __enter__(self):
        self.count, self.saved = 0, {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def counting(original):
            def wrapper(*args, **kwargs):
                self.count += 1
                return original(*args, **kwargs)
            return wrapper

        for name, original in self.saved.items():
            setattr(torch.Tensor, name, counting(original))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


with HostReads() as probe:  # the counter does count
    bool(torch.ones(()))
report["probe"] = probe.count

# BatchNorm on the full batch vs SyncBatchNorm2d on each half, two training steps.
C = 5
ref = nn.BatchNorm2d(C)
nn.init.uniform_(ref.weight, 0.5, 1.5)
nn.init.uniform_(ref.bias, -0.5, 0.5)
bn = convert_sync_batchnorm(copy.deepcopy(ref))
assert type(bn) is SyncBatchNorm2d
for step in range(2):
    x = torch.randn(8, C, 6, 7) * 3 + torch.arange(C).view(1, C, 1, 1)
    g = torch.randn_like(x)  # d loss / d y
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(g)
    x_half = halves(x).clone().requires_grad_()
    bn.zero_grad()
    with HostReads() as reads:
        y = bn(x_half)
        y.backward(halves(g))
    report[f"step{step}"] = {
        "y": y.detach(), "y_ref": halves(y_ref.detach()),
        "dx": x_half.grad, "dx_ref": halves(x_ref.grad),
        "dw": summed(bn.weight.grad), "dw_ref": ref.weight.grad.clone(),
        "db": summed(bn.bias.grad), "db_ref": ref.bias.grad.clone(),
        "running_mean": bn.running_mean.clone(), "running_mean_ref": ref.running_mean.clone(),
        "running_var": bn.running_var.clone(), "running_var_ref": ref.running_var.clone(),
        "batches": bn.num_batches_tracked.clone(), "batches_ref": ref.num_batches_tracked.clone(),
        "host_reads": reads.count,
    }
    ref.weight.grad = ref.bias.grad = None

# momentum=None: the cumulative average of BatchNorm.
ref_cum, bn_cum = nn.BatchNorm2d(C, momentum=None), SyncBatchNorm2d(C, momentum=None)
for _ in range(3):
    x = torch.randn(8, C, 4, 4) + 2
    ref_cum(x)
    bn_cum(halves(x))
report["cumulative"] = {"running_var": bn_cum.running_var, "running_var_ref": ref_cum.running_var,
                        "running_mean": bn_cum.running_mean,
                        "running_mean_ref": ref_cum.running_mean}

# A channel with mean 1e4 and std 1: the variance against float64 arithmetic.
x = torch.randn(8, 1, 16, 16, dtype=torch.float64) + 1e4
bn_far = SyncBatchNorm2d(1, momentum=1.0)  # running_var = the batch's unbiased variance
bn_far(halves(x).float())
report["far_mean"] = {"running_var": bn_far.running_var.double(),
                      "var64": x.float().double().var(correction=1).view(1)}

# bf16 autocast: a bf16 input comes back bf16, from fp32 statistics.
x = torch.randn(8, C, 6, 6)
bn16 = SyncBatchNorm2d(C)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y16 = bn16(halves(x).bfloat16())
report["bf16"] = {"dtype": str(y16.dtype), "y": y16.float(),
                  "y_ref": halves(nn.BatchNorm2d(C)(x)).detach()}

# The real generator (model.norm=batch), one forward/backward: plain BatchNorm on the full batch
# in one process against the converted copy on each rank's half.
cfg = ModelConfig(ngf=8, depth=3, norm=Norm.batch, zero_init_head=False)
G_ref = build_generator(cfg)
G = convert_sync_batchnorm(copy.deepcopy(G_ref))
cond = torch.rand(4, 3, 1, 32, 32) * 2 - 1
out_ref = G_ref(cond)
out_ref.square().mean().mul(len(cond)).backward()  # a sum over samples: ranks' losses add up
out_g = G(halves(cond))
out_g.square().mean().mul(len(cond) // world).backward()
bn_names = [n for n, m in G.named_modules() if isinstance(m, SyncBatchNorm2d)]
params = dict(G.named_parameters())
report["generator"] = {
    "sync_layers": len(bn_names),
    "out": out_g.detach(), "out_ref": halves(out_ref.detach()),
    "grads": {n: summed(p.grad) for n, p in params.items()},
    "grads_ref": {n: p.grad for n, p in G_ref.named_parameters()},
    "buffers": {n: b for n, b in G.named_buffers()},
    "buffers_ref": {n: b for n, b in G_ref.named_buffers()},
}
torch.save(report, out / f"report-{rank}.pt")
dist.destroy_process_group()
