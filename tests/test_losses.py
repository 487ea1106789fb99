"""The losses (models/losses.py) against their formulas, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from models import GANLoss, LossConfig, build_loss

# Two real and two fake logits, shaped like a tiny PatchGAN output [B=1, 1, 1, 2].
REAL = torch.tensor([[[[0.5, 2.0]]]])
FAKE = torch.tensor([[[[-1.0, 0.5]]]])
LN3 = math.log(3.0)


def loss(**kw) -> GANLoss:
    return build_loss(LossConfig(**kw))


@pytest.mark.parametrize(
    "kind, real, fake, d_real, d_fake, g_adv",
    [
        # (r - 1)^2: 0.25, 1 -> 0.625;  f^2: 1, 0.25 -> 0.625;  (f - 1)^2: 4, 0.25 -> 2.125
        ("lsgan", REAL, FAKE, 0.625, 0.625, 2.125),
        # relu(1 - r): 0.5, 0 -> 0.25;  relu(1 + f): 0, 1.5 -> 0.75;  -f: 1, -0.5 -> 0.25
        ("hinge", REAL, FAKE, 0.25, 0.75, 0.25),
        # -log sigmoid(r) for r = 0, ln 3: ln 2, ln 4/3;  -log(1 - sigmoid(f)) for f = 0, ln 3:
        # ln 2, ln 4;  G (non-saturating) -log sigmoid(f): ln 2, ln 4/3
        (
            "vanilla",
            torch.tensor([[0.0], [LN3]]),
            torch.tensor([[0.0], [LN3]]),
            math.log(8 / 3) / 2,
            math.log(8) / 2,
            math.log(8 / 3) / 2,
        ),
    ],
)
def test_adversarial_losses_match_their_formulas(kind, real, fake, d_real, d_fake, g_adv):
    L = loss(adversarial=kind)
    d = L.d_loss(real, fake)
    assert d.real.item() == pytest.approx(d_real, rel=1e-6)
    assert d.fake.item() == pytest.approx(d_fake, rel=1e-6)
    assert d.total.item() == pytest.approx(d_real + d_fake, rel=1e-6)
    assert L.g_adv(fake).item() == pytest.approx(g_adv, rel=1e-6)


def test_pixel_losses_and_weighting_match_their_formulas():
    pred = torch.tensor([0.5, -0.5, 1.0, 0.0]).view(1, 1, 2, 2)
    target = torch.zeros(1, 1, 2, 2)
    assert loss(pixel="l1").pixel(pred, target).item() == pytest.approx(0.5)  # (.5+.5+1+0)/4
    assert loss(pixel="l2").pixel(pred, target).item() == pytest.approx(0.375)  # (.25+.25+1)/4
    # G: lambda_adv * lsgan + lambda_pixel * l1 = 3 * 2.125 + 20 * 0.5
    g = loss(lambda_adv=3.0).g_loss(FAKE, pred, target)
    assert (g.adv.item(), g.pixel.item()) == pytest.approx((2.125, 0.5))
    assert g.total.item() == pytest.approx(3 * 2.125 + 20 * 0.5)


def test_defaults_are_the_first_seeds():
    L = loss()
    assert (L.adversarial.value, L.pixel_kind.value) == ("lsgan", "l1")
    assert (L.lambda_adv, L.lambda_pixel) == (1.0, 20.0)


@pytest.mark.parametrize("kind", ["lsgan", "vanilla", "hinge"])
def test_losses_are_fp32_under_autocast(kind):
    """bf16 logits in, an autocast region around: the result is the fp32 value of the inputs."""
    torch.manual_seed(0)
    real = (torch.randn(4, 1, 8, 8) * 3).bfloat16()
    fake = (torch.randn(4, 1, 8, 8) * 3).bfloat16()
    pred, target = torch.rand(4, 2, 8, 8).bfloat16(), torch.rand(4, 2, 8, 8).bfloat16()
    L = loss(adversarial=kind)
    reference = (
        L.d_loss(real.float(), fake.float()),
        L.g_loss(fake.float(), pred.float(), target.float()),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d, g = L.d_loss(real, fake), L.g_loss(fake, pred, target)
    for got, want in zip((*d, *g), (*reference[0], *reference[1])):
        if want is None:  # the temporal term: off
            assert got is None
            continue
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


def test_losses_backpropagate_to_logits():
    real = torch.tensor([0.3, -0.2], requires_grad=True)
    fake = torch.tensor([0.1, 0.4], requires_grad=True)
    L = loss()
    L.d_loss(real, fake).total.backward()
    # d/dr mean((r - 1)^2) = (r - 1); d/df mean(f^2) = f   (means over 2 elements)
    torch.testing.assert_close(real.grad, real.detach() - 1)
    torch.testing.assert_close(fake.grad, fake.detach())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(adversarial="wgan"), "adversarial: unknown option 'wgan'; expected one of: lsgan"),
        (dict(pixel="l3"), "pixel: unknown option 'l3'; expected one of: l1, l2"),
        (dict(lambda_pixel=-1.0), "lambda_pixel: a loss weight, must be finite and >= 0"),
        (dict(lambda_chroma=float("nan")), "lambda_chroma: a loss weight, must be finite and >= 0"),
        (dict(lambda_adv=float("inf")), "lambda_adv: a loss weight, must be finite and >= 0"),
        (dict(adv_start_step=-1), "adv_start_step: a trainer step, must be >= 0"),
    ],
)
def test_unknown_or_invalid_option_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        loss(**change)


# --- recipe options: pixel-only warm-up, chroma term ---------------------------------------


def test_warm_up_leaves_the_adversarial_term_out_until_its_step():
    L = loss(adv_start_step=3, lambda_adv=2.0)
    assert [L.adv_weight(s) for s in range(5)] == [0.0, 0.0, 0.0, 2.0, 2.0]
    pred = torch.tensor([0.5, -0.5, 1.0, 0.0]).view(1, 1, 2, 2)
    target = torch.zeros(1, 1, 2, 2)
    # before the step: pixel only, even when D's logits are not finite (left out, not * 0)
    nan = torch.full_like(FAKE, float("nan"))
    g = L.g_loss(nan, pred, target, L.adv_weight(2))
    assert g.total.item() == pytest.approx(20 * 0.5) and g.adv.isnan()
    # from the step: lambda_adv * lsgan + lambda_pixel * l1
    g = L.g_loss(FAKE, pred, target, L.adv_weight(3))
    assert g.total.item() == pytest.approx(2 * 2.125 + 20 * 0.5)
    with pytest.raises(ValueError, match="adv_start_step is set: the step must be given"):
        L.adv_weight(None)
    assert loss().adv_weight(None) == 1.0  # no warm-up: no step needed


def test_chroma_term_is_zero_at_the_truth_and_pushes_saturation_up():
    torch.manual_seed(0)
    truth = torch.rand(2, 2, 8, 8) - 0.5  # a,b
    L = loss(lambda_chroma=5.0)
    assert L.chroma(truth, truth).item() == 0.0
    # hue-blind: the same saturation at the opposite hue costs nothing
    assert L.chroma(-truth, truth).item() == pytest.approx(0.0, abs=1e-6)
    # a desaturated prediction: positive, and gradient descent on the term raises its chroma
    pred = (0.3 * truth).requires_grad_()
    term = L.chroma(pred, truth)
    assert term.item() > 0.05
    term.backward()
    stepped = pred.detach() - 0.1 * pred.grad
    c = lambda x: x.square().sum(1).sqrt().mean().item()  # noqa: E731
    assert c(pred.detach()) < c(stepped) < c(truth)
    # in G's loss with its weight; Lab (line art) uses the last two channels, a,b
    g = L.g_loss(FAKE, pred.detach(), truth)
    assert g.total.item() == pytest.approx(2.125 + 20 * g.pixel.item() + 5 * term.item())
    lab = torch.cat([torch.zeros(2, 1, 8, 8), truth], 1)
    assert L.chroma(lab, lab * torch.tensor([1.0, 0.3, 0.3]).view(1, 3, 1, 1)).item() == (
        pytest.approx(term.item()))
    # grey (a = b = 0, a zero-initialised head): finite, with a finite gradient
    grey = torch.zeros(2, 2, 8, 8, requires_grad=True)
    L.chroma(grey, truth).backward()
    assert torch.isfinite(grey.grad).all()


def test_chroma_term_is_off_by_default_but_logged():
    torch.manual_seed(0)
    truth = torch.rand(2, 2, 8, 8) - 0.5
    g = loss().g_loss(FAKE, 0.3 * truth, truth)
    assert g.chroma.item() > 0
    assert g.total.item() == pytest.approx(2.125 + 20 * g.pixel.item())


def test_the_temporal_term_is_one_more_slot_of_gs_loss():
    """Given G's colour of t-1 with the flow and mask, g_loss adds lambda_temporal * the
    masked L1 to its warped colour; without them, or at weight 0, the slot is None."""
    from models.losses import temporal_loss

    torch.manual_seed(0)
    pred, target, prev = torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8)
    flow, mask = torch.zeros(2, 2, 8, 8), torch.ones(2, 1, 8, 8)
    off = loss(lambda_temporal=0.0).g_loss(FAKE, pred, target, previous=(prev, flow, mask))
    on = loss(lambda_temporal=10.0).g_loss(FAKE, pred, target, previous=(prev, flow, mask))
    assert off.temporal is None and loss(lambda_temporal=10.0).g_loss(
        FAKE, pred, target).temporal is None
    assert torch.equal(on.temporal, temporal_loss(pred, prev, flow, mask))
    assert torch.allclose(on.total, off.total + 10.0 * on.temporal)
