"""SyncBatchNorm2d: on 2 real gloo ranks it equals nn.BatchNorm2d on the full batch; alone or in
eval mode it is nn.BatchNorm2d; its state is a BatchNorm2d's; it never reads a value on the
host."""

from __future__ import annotations

import copy

import pytest
import torch
from launching import launch
from torch import nn

from models import ModelConfig, Norm, build_generator
from trainer.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32: the two sides sum in different orders


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn")
    result = launch("tests/syncbn_ranks.py", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [torch.load(out / f"report-{r}.pt") for r in range(2)]


@pytest.mark.parametrize("step", ["step0", "step1"])
def test_two_ranks_equal_batchnorm_on_the_full_batch(reports, step):
    for report in reports:
        r = report[step]
        for name in ("y", "dx", "dw", "db", "running_mean", "running_var"):
            torch.testing.assert_close(r[name], r[f"{name}_ref"], **TOL, msg=name)
        assert r["batches"] == r["batches_ref"]


def test_no_host_reads_during_forward_and_backward(reports):
    assert reports[0]["probe"] == 1  # a bool() is counted
    assert [r[s]["host_reads"] for r in reports for s in ("step0", "step1")] == [0] * 4


def test_cumulative_average_without_momentum(reports):
    r = reports[0]["cumulative"]
    torch.testing.assert_close(r["running_mean"], r["running_mean_ref"], **TOL)
    torch.testing.assert_close(r["running_var"], r["running_var_ref"], **TOL)


def test_variance_of_a_channel_far_from_zero(reports):
    """Mean 1e4, std 1: E[x^2] - E[x]^2 on fp32 sums would be off by ~10; ours is not."""
    r = reports[0]["far_mean"]
    torch.testing.assert_close(r["running_var"], r["var64"], rtol=1e-4, atol=0)


def test_bf16_autocast_keeps_the_dtype_and_fp32_statistics(reports):
    r = reports[0]["bf16"]
    assert r["dtype"] == "torch.bfloat16"
    torch.testing.assert_close(r["y"], r["y_ref"], rtol=0, atol=0.05)  # bf16 rounding only


def test_generator_on_two_ranks_equals_one_process_on_the_full_batch(reports):
    for report in reports:
        g = report["generator"]
        assert g["sync_layers"] > 0
        torch.testing.assert_close(g["out"], g["out_ref"], **TOL)
        assert g["grads"].keys() == g["grads_ref"].keys()
        for name, grad in g["grads"].items():
            torch.testing.assert_close(grad, g["grads_ref"][name], rtol=1e-3, atol=1e-5,
                                       msg=name)
        for name, buffer in g["buffers"].items():
            torch.testing.assert_close(buffer, g["buffers_ref"][name], **TOL, msg=name)
    a, b = (r["generator"]["buffers"] for r in reports)
    assert all(torch.equal(a[n], b[n]) for n in a)  # ranks agree bitwise


def bn_pair(momentum=0.1) -> tuple[nn.BatchNorm2d, SyncBatchNorm2d]:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, momentum=momentum)
    nn.init.uniform_(ref.weight, 0.5, 1.5)
    nn.init.uniform_(ref.bias, -0.5, 0.5)
    return ref, convert_sync_batchnorm(copy.deepcopy(ref))


@pytest.mark.parametrize("training", [True, False])
def test_alone_or_in_eval_mode_it_is_batchnorm(training):
    """No process group (a single process) in training mode, or eval mode: bitwise BatchNorm."""
    ref, bn = bn_pair()
    ref.train(training), bn.train(training)
    x = torch.randn(6, 4, 5, 5) + 1
    for _ in range(2):
        assert torch.equal(bn(x), ref(x))
    for (name, a), b in zip(bn.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_is_batchnorms_and_loads_into_it():
    ref, bn = bn_pair()
    bn(torch.randn(4, 4, 3, 3))  # moves the running statistics
    assert list(bn.state_dict()) == list(ref.state_dict())
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(bn.state_dict())
    for name, value in bn.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value)


def test_convert_keeps_parameters_and_buffers_and_leaves_other_norms():
    G = build_generator(ModelConfig(ngf=8, depth=3, norm=Norm.batch))
    G = G.to(torch.float64).to(memory_format=torch.channels_last)
    G.add_module("other", nn.Sequential(nn.GroupNorm(2, 4), nn.InstanceNorm2d(4),
                                        nn.BatchNorm1d(4)))
    before = {n: t for n, t in [*G.named_parameters(), *G.named_buffers()]}
    kinds = [type(m) for m in G.modules()]
    assert convert_sync_batchnorm(G) is G
    after = {n: t for n, t in [*G.named_parameters(), *G.named_buffers()]}
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)  # the very tensors: dtype, memory format
    swapped = [k for k, m in zip(kinds, G.modules(), strict=True) if type(m) is not k]
    assert swapped and set(swapped) == {nn.BatchNorm2d}
    assert not any(type(m) is nn.BatchNorm2d for m in G.modules())
    assert [type(m) for m in G.other] == [nn.GroupNorm, nn.InstanceNorm2d, nn.BatchNorm1d]
