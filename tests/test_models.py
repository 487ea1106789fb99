"""Behaviour of the generators and discriminators (models/), tiny and on CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from models import (
    DHead,
    LossConfig,
    Mode,
    ModelConfig,
    Norm,
    assemble_d_input,
    build_discriminator,
    build_generator,
    build_loss,
    d_in_channels,
    memory_of,
    no_memory_like,
    previous_colour,
)
from models.generator import GreyUNet, LineartUNet
from models.rollout import ClipFrame, clip_frames, first_frame_colour, rollout, window
from models.summary import main as summary_main
from models.summary import receptive_field

# frames must be multiples of 8; a random chroma head (the library starts at grey) so that what
# reaches the output is visible in it
TINY = dict(ngf=8, ndf=8, depth=3, zero_init_head=False)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def smooth(*shape: int) -> torch.Tensor:
    """Random values in [-1, 1] varying smoothly in space, like image content."""
    coarse = torch.rand(*shape[:-2], 4, 4).reshape(-1, 1, 4, 4) * 2 - 1
    return F.interpolate(coarse, size=shape[-2:], mode="bilinear").reshape(shape)


def grey_batch(b: int = 2, h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """condition [B, 3, 1, H, W] (L), target [B, 3, 2, H, W] (a,b), normalized."""
    return smooth(b, 3, 1, h, w), 0.5 * smooth(b, 3, 2, h, w)


def lineart_batch(b: int = 2, h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """condition [B, 3, 1, H, W] (line art, -1 lines on +1), target [B, 3, 3, H, W] (Lab)."""
    lines = torch.where(torch.rand(b, 3, 1, h, w) < 0.1, -1.0, 1.0)
    return lines, smooth(b, 3, 3, h, w)


# --- generator: shapes, ranges, modes -------------------------------------------------------


@pytest.mark.parametrize("norm", list(Norm))
def test_grey_generator_shapes_and_range(norm):
    torch.manual_seed(0)
    G = build_generator(tiny(norm=norm))
    cond, _ = grey_batch(2, 32, 48)  # not square: H and W are handled separately
    ab = G(100 * cond)  # huge inputs: only the tanh keeps the output in range
    assert isinstance(G, GreyUNet)
    assert ab.shape == (2, 2, 32, 48)
    assert ab.abs().max() <= 1.0 and ab.abs().max() > 0.5
    assert ab.std() > 0


def test_lineart_generator_shapes_and_range():
    torch.manual_seed(0)
    G = build_generator(tiny(mode=Mode.lineart))
    cond, target = lineart_batch(2, 48, 32)
    lab = G(100 * cond[:, 1], memory_of(target[:, 0], cond[:, 0]))
    assert isinstance(G, LineartUNet)
    assert lab.shape == (2, 3, 48, 32)
    assert lab.abs().max() <= 1.0 and lab.abs().max() > 0.5


def test_yaml_strings_build_the_same_networks():
    """The config tree delivers enum members from YAML strings; the builders take a DictConfig."""
    yaml = "mode: lineart\nnorm: instance\nd_head: global\nngf: 8\nndf: 8\ndepth: 3\n"
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(yaml))
    assert cfg.norm is Norm.instance and cfg.d_head is DHead["global"]
    G, D = build_generator(cfg), build_discriminator(cfg)
    assert isinstance(G, LineartUNet)
    assert any(isinstance(m, nn.InstanceNorm2d) for m in G.modules())
    assert D(torch.zeros(1, d_in_channels(cfg), 32, 32)).shape == (1, 1)


# --- temporal structure of the grey generator ----------------------------------------------


def test_shared_encoder_one_parameter_set_gradients_from_all_three_frames():
    torch.manual_seed(0)
    G = build_generator(tiny(norm=Norm.group))
    # one encoder: exactly one conv reads a raw 1-channel frame
    assert len([m for m in G.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 1]) == 1
    stem = G.encoder.stem[0]
    outs = []  # the stem runs twice: frame t [B, ...], then t-1 and t+1 folded [B * 2, ...]
    stem.register_forward_hook(lambda m, i, out: outs.append(out))
    cond, target = grey_batch(2)
    loss = (G(cond) - target[:, 1]).abs().mean()
    loss.backward(retain_graph=True)
    centre, neighbours = outs
    assert centre.shape[0] == 2 and neighbours.shape[0] == 4
    g_centre, g_neighbours = torch.autograd.grad(loss, [centre, neighbours], retain_graph=True)
    parts = [None, None, None]
    (parts[1],) = torch.autograd.grad(centre, stem.weight, g_centre, retain_graph=True)
    for k, frame in ((0, 0), (2, 1)):  # t-1 and t+1 alternate in the folded batch
        mask = torch.zeros(2, 2, 1, 1, 1)
        mask[:, frame] = 1
        (parts[k],) = torch.autograd.grad(
            neighbours, stem.weight, (g_neighbours.unflatten(0, (2, 2)) * mask).flatten(0, 1),
            retain_graph=True,
        )
    for k, part in enumerate(parts):
        assert part.norm() > 1e-3 * stem.weight.grad.norm(), f"no gradient from frame {k}"
    # the one weight tensor's gradient is the sum of the three frames' contributions
    torch.testing.assert_close(sum(parts), stem.weight.grad)


def _decoder_inputs(G: GreyUNet, cond: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor]:
    seen = {}
    handle = G.decoder.register_forward_pre_hook(lambda m, args: seen.update(args=args))
    with torch.no_grad():
        out = G(cond)
    handle.remove()
    bottleneck, skips, _ = seen["args"]
    return bottleneck, skips, out


def test_skips_come_from_the_centre_frame():
    torch.manual_seed(0)
    G = build_generator(tiny(norm=Norm.instance)).eval()
    cond, _ = grey_batch(2)
    noise = 0.5 * smooth(2, 1, 32, 32)
    base_b, base_skips, base = _decoder_inputs(G, cond)
    change = {}
    for k in range(3):
        moved = cond.clone()
        moved[:, k] += noise
        b, skips, out = _decoder_inputs(G, moved)
        same_skips = all(torch.equal(s, t) for s, t in zip(skips, base_skips))
        assert same_skips == (k != 1), f"frame {k}: skips should change iff the centre moves"
        assert not torch.equal(b, base_b), f"frame {k} does not reach the bottleneck"
        change[k] = (out - base).abs().mean().item()
    assert change[0] < change[1] and change[2] < change[1], change
    assert change[0] > 0 and change[2] > 0, change


def test_per_frame_ablation_ignores_neighbours_with_the_same_parameters():
    torch.manual_seed(0)
    temporal = build_generator(tiny(norm=Norm.instance))
    ablation = build_generator(tiny(norm=Norm.instance, temporal=False)).eval()
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(ablation) == count(temporal)
    cond, _ = grey_batch(2)
    moved = cond.clone()
    moved[:, [0, 2]] = -moved[:, [0, 2]]
    with torch.no_grad():
        torch.testing.assert_close(ablation(moved), ablation(cond), rtol=0, atol=0)
        moved[:, 1] += 0.5
        assert not torch.equal(ablation(moved), ablation(cond))


# --- colour memory: what G gets as the previous colour -----------------------------------


def memory_model(mode: Mode, **kw) -> tuple[ModelConfig, torch.Tensor, torch.Tensor]:
    """(config, condition, target) of a tiny model with colour memory in `mode`."""
    cfg = tiny(mode=mode, norm=Norm.group, memory=True, **kw)
    return (cfg, *(grey_batch(64) if mode == Mode.grey else lineart_batch(64)))


def frame_input(cond: torch.Tensor, mode: Mode) -> torch.Tensor:
    """G's frame input for frame t: the L triplet, or the line art of t."""
    return cond if mode == Mode.grey else cond[:, 1]


def a_gate_that_opens(G: nn.Module) -> None:
    """The gate starts at 1/2 everywhere; a bias that varies the gate shows more."""
    with torch.no_grad():
        G.gate.net[-1].weight.normal_(0, 0.5)


@pytest.mark.parametrize("mode", list(Mode))
def test_previous_colour_none_truth_and_own_prediction(mode):
    torch.manual_seed(0)
    cfg, cond, target = memory_model(mode)
    G = build_generator(cfg).eval()
    c = target.shape[2]
    truth = memory_of(target[:, 0], cond[:, 0])
    none = no_memory_like(cond[:, 0], mode)
    assert torch.equal(none, torch.zeros(64, c + 2, 32, 32))  # no memory: all zeros
    # the colour, present = 1, and the frame's own condition (where to find the colour)
    assert torch.equal(truth, torch.cat([target[:, 0], torch.ones(64, 1, 32, 32), cond[:, 0]],
                                        dim=1))

    made = first_frame_colour(G, cond, mode, memory=True)  # G's own colour of t-1

    def pick(**kw):
        return previous_colour(cond, target, replace(cfg, **kw), own=made)

    assert torch.equal(pick(p_drop=1.0), none)
    assert torch.equal(pick(p_drop=0.0), truth)
    frame = cond[:, [0, 0, 1]] if mode == Mode.grey else cond[:, 0]  # frame t-1, no t-2
    with torch.no_grad():
        own = memory_of(G(frame, none), cond[:, 0])
    torch.testing.assert_close(pick(p_drop=0.0, scheduled_sampling=1.0), own)
    # a mixture: every sample is exactly one of the three, in about the right proportions
    gen = torch.Generator().manual_seed(1)
    out = previous_colour(cond, target, replace(cfg, p_drop=0.5, scheduled_sampling=0.25),
                          gen, own=made)
    kinds = [next(i for i, ref in enumerate((none, truth, own)) if torch.equal(o, ref[j]))
             for j, o in enumerate(out)]
    counts = [kinds.count(i) for i in range(3)]
    assert 20 <= counts[0] <= 44 and 8 <= counts[1] <= 26 and 6 <= counts[2] <= 26, counts


@pytest.mark.parametrize("mode", list(Mode))
def test_memory_changes_the_output_and_the_per_frame_control_ignores_it(mode):
    torch.manual_seed(0)
    cfg, cond, target = memory_model(mode)
    cond, target, x = cond[:2], target[:2], frame_input(cond[:2], mode)
    G = build_generator(cfg).eval()
    per_frame = build_generator(replace(cfg, temporal=False)).eval()
    per_frame.load_state_dict(G.state_dict(), strict=False)  # the control has no gate
    red, blue = (memory_of(c, cond[:, 0]) for c in (target[:, 0], -target[:, 0]))
    none = no_memory_like(x, mode)
    with torch.no_grad():
        assert not torch.equal(G(x, red), G(x, blue))
        assert not torch.equal(G(x, red), G(x, none))  # a memory is not the same as none
        assert torch.equal(G(x, none), G(x))
        assert torch.equal(per_frame(x, red), per_frame(x, blue))
        assert torch.equal(per_frame(x, red), per_frame(x))
    if mode == Mode.grey:
        plain = build_generator(tiny(norm=Norm.group)).eval()
        with pytest.raises(ValueError, match="no colour memory"):
            plain(cond, red)
        assert plain.gate is None


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    return torch.roll(x, (dy, dx), dims=(-2, -1))


@pytest.mark.parametrize("mode", list(Mode))
def test_the_memory_is_found_where_it_moved(mode):
    """A frame that moved by (2, -1) pixels of the half-resolution search: with keys that
    match like patches (patch pixels as keys, a sharp temperature), each pixel finds its
    previous colour where it moved to, not the colour that was at its own place."""
    torch.manual_seed(0)
    cfg, _, _ = memory_model(mode)
    gate = build_generator(cfg).gate
    with torch.no_grad():  # keys: 8 pixels of each 3x3 patch, x 300: the matching patch wins
        for conv in (gate.key[0], gate.key[2]):
            conv.weight.zero_(), conv.bias.zero_()
        for c, (dy, dx) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0),
                                      (2, 1)]):
            gate.key[0].weight[c, 0, dy, dx] = 1.0
        gate.key[0].bias.fill_(1.0)  # frame + 1 > 0: the LeakyReLU passes it unchanged
        gate.key[2].weight[range(8), range(8), 1, 1] = 300.0
        gate.offset_bias.zero_()

    def blocks(*shape):  # random 2x2 blocks: exact at half resolution
        return F.interpolate(torch.rand(*shape[:-2], shape[-2] // 2, shape[-1] // 2) * 2 - 1,
                             scale_factor=2.0, mode="nearest")

    prev, colour = blocks(1, 1, 32, 32), blocks(1, cfg_colours(mode), 32, 32)
    frame = shifted(prev, 4, -2)  # (2, -1) at half resolution
    found, presence = gate.find(frame, memory_of(colour, prev))

    def as_found(x):  # what the search returns for a colour field it finds exactly
        return F.interpolate(F.avg_pool2d(x, 2), size=(32, 32), mode="bilinear",
                             align_corners=False)

    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))  # away from the borders
    expected = as_found(shifted(colour, 4, -2))
    torch.testing.assert_close(found[inner], expected[inner], atol=1e-3, rtol=0)
    torch.testing.assert_close(presence[inner], torch.ones_like(presence[inner]))
    assert (found[inner] - as_found(colour)[inner]).abs().mean() > 0.3  # not the colour in place


def test_a_full_memory_is_present_up_to_the_frame_border():
    """Window positions outside the frame are no candidates: a memory present everywhere is
    found present everywhere, corners included (else a keyframe would fade at the border)."""
    torch.manual_seed(0)
    gate = build_generator(memory_model(Mode.grey)[0]).gate
    frame = torch.rand(2, 1, 32, 48) * 2 - 1
    _, presence = gate.find(frame, memory_of(torch.rand(2, 2, 32, 48) * 2 - 1, frame))
    torch.testing.assert_close(presence, torch.ones_like(presence))
    half = memory_of(torch.rand(2, 2, 32, 48), frame)
    half[:, 2, :, 24:] = 0  # the right half has no memory: it is found absent there
    _, presence = gate.find(frame, half)
    assert presence[..., 30:].max() < 0.01 and presence[..., :18].min() > 0.99


def cfg_colours(mode: Mode) -> int:
    return 2 if mode == Mode.grey else 3


@pytest.mark.parametrize("mode", list(Mode))
def test_the_memory_is_blended_never_amplified(mode):
    """The output lies between G's own colour and the colours in the memory, so a recurrence
    fed its own output on a static shot stays within the colours it started from: it cannot
    drift into saturated blobs."""
    torch.manual_seed(0)
    cfg, cond, target = memory_model(mode)
    cond, target, x = cond[:2], target[:2], frame_input(cond[:2], mode)
    G = build_generator(cfg).eval()
    a_gate_that_opens(G)
    with torch.no_grad():
        auto = G(x)
        for value in (-0.7, 0.2, 1.0):  # a flat memory: the bound holds pixel by pixel
            memory = torch.full_like(auto, value)
            out = G(x, memory_of(memory, cond[:, 0]))
            low, high = torch.minimum(auto, memory), torch.maximum(auto, memory)
            assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
            assert not torch.equal(out, auto)
        keyframe = target[:, 0]
        memory = memory_of(keyframe, cond[:, 1])
        for _ in range(100):  # a static shot from a keyframe
            out = G(x, memory)
            memory = memory_of(out, cond[:, 1])
        per_channel = (2, 3)  # the range of each colour channel over the frame
        low = torch.minimum(auto.amin(per_channel), keyframe.amin(per_channel))
        high = torch.maximum(auto.amax(per_channel), keyframe.amax(per_channel))
        assert (out >= low[..., None, None] - 1e-5).all()
        assert (out <= high[..., None, None] + 1e-5).all()


# --- G over a clip (models/rollout.py) -------------------------------------------------------


class Recording(nn.Module):
    """Stands in for G: records each call's inputs; frame input in, a distinct colour out."""

    def __init__(self, colours: int):
        super().__init__()
        self.calls, self.colours = [], colours

    def forward(self, frame, memory=None):
        self.calls.append((frame.clone(), None if memory is None else memory.clone()))
        return torch.full((frame.shape[0], self.colours, *frame.shape[-2:]),
                          0.1 * len(self.calls))


def frames_of(scenes: list[int], b: int = 2) -> list[ClipFrame]:
    torch.manual_seed(0)
    return [ClipFrame(torch.rand(b, 1, 8, 8), scene, tag=t) for t, scene in enumerate(scenes)]


def test_grey_windows_are_padded_at_a_clip_s_ends_and_at_scene_cuts_and_batched_in_time():
    frames, G = frames_of([0, 0, 1, 1, 1]), Recording(2)
    out = list(rollout(G, frames, Mode.grey, memory=False, batch=2))
    assert [f.tag for f, _ in out] == list(range(5))  # in order, all of them
    assert [call[0].shape[0] for call in G.calls] == [4, 4, 2]  # 2 frames of B = 2 per call
    windows = torch.cat([call[0] for call in G.calls]).split(2)
    c = [f.cond for f in frames]
    expected = [(c[0], c[0], c[1]), (c[0], c[1], c[1]), (c[2], c[2], c[3]), (c[2], c[3], c[4]),
                (c[3], c[4], c[4])]  # frame t stands in for a neighbour of another scene
    for t, (got, (p, x, n)) in enumerate(zip(windows, expected)):
        assert torch.equal(got, torch.stack([p, x, n], dim=1)), t
    assert torch.equal(window(None, c[0], c[1]), torch.stack([c[0], c[0], c[1]], dim=1))
    assert torch.equal(out[3][1], torch.full((2, 2, 8, 8), 0.2))  # its part of the 2nd call


@pytest.mark.parametrize("mode", list(Mode))
def test_the_memory_restarts_at_a_scene_and_goes_on_from_a_given_colour(mode):
    c = 2 if mode == Mode.grey else 3
    frames, G = frames_of([0, 0, 0, 1, 1]), Recording(c)
    given = torch.full((2, c, 8, 8), -0.5)
    frames[1] = frames[1]._replace(given=given)
    out = list(rollout(G, frames, mode, memory=True, batch=4))  # recurrent: one frame a call
    assert out[1][1] is given and len(G.calls) == 4  # no G call for the given frame
    memories = [memory for _, memory in G.calls]  # frames 0, 2, 3, 4
    none = no_memory_like(frames[0].cond, mode)
    assert torch.equal(memories[0], none)
    assert torch.equal(memories[1], memory_of(given, frames[1].cond))
    assert torch.equal(memories[2], none)  # frame 3: a scene's first frame
    assert torch.equal(memories[3], memory_of(out[3][1], frames[3].cond))
    inputs = [frame for frame, _ in G.calls]
    assert inputs[0].shape == ((2, 3, 1, 8, 8) if mode == Mode.grey else (2, 1, 8, 8))


@pytest.mark.parametrize("mode", list(Mode))
def test_first_frame_colour_is_frame_t_minus_1_of_the_triplet_as_a_clip(mode):
    """G's colour of t-1 for the step: the triplet's first frame from no memory, G run once."""
    torch.manual_seed(0)
    cfg, cond, _ = memory_model(mode)
    cond = cond[:2]
    G = build_generator(cfg).eval()
    calls = []
    G.register_forward_hook(lambda *_: calls.append(1))
    own = first_frame_colour(G, cond, mode, memory=True)
    assert len(calls) == 1 and not own.requires_grad
    frame = cond[:, [0, 0, 1]] if mode == Mode.grey else cond[:, 0]
    with torch.no_grad():
        assert torch.equal(own, G(frame, no_memory_like(cond[:, 0], mode)))
        clip = [colour for _, colour in rollout(G, clip_frames(cond), mode, memory=True)]
    assert torch.equal(clip[0], own) and len(clip) == 3


# --- discriminators -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("temporal", [True, False])
@pytest.mark.parametrize("head", list(DHead))
def test_discriminator_input_and_output_shapes(mode, conditional, temporal, head):
    cfg = tiny(mode=mode, d_conditional=conditional, d_temporal=temporal, d_head=head)
    cond, target = grey_batch(2, 32, 64) if mode == Mode.grey else lineart_batch(2, 32, 64)
    x = assemble_d_input(cfg, cond, target[:, 1], target)
    c = target.shape[2]
    assert x.shape == (2, d_in_channels(cfg), 32, 64)
    assert d_in_channels(cfg) == (3 if temporal else 1) * (c + conditional)
    logits = build_discriminator(cfg)(x)
    assert logits.shape == ((2, 1, 2, 6) if head == DHead.patch else (2, 1))


def test_d_input_layout():
    cond, target = grey_batch(2)
    fake = torch.rand(2, 2, 32, 32)
    # conditional, per frame: L then a,b -- the Lab frame, with G's chroma
    x = assemble_d_input(tiny(), cond, fake)
    assert torch.equal(x, torch.cat([cond[:, 1], fake], dim=1))
    assert torch.equal(assemble_d_input(tiny(d_conditional=False), cond, fake), fake)
    # temporal: the real neighbours surround the judged frame, each with its condition
    x = assemble_d_input(tiny(d_temporal=True), cond, fake, target)
    frames = [target[:, 0], fake, target[:, 2]]
    assert torch.equal(x, torch.cat([t for k in range(3) for t in (cond[:, k], frames[k])], 1))
    with pytest.raises(ValueError, match="needs the real triplet"):
        assemble_d_input(tiny(d_temporal=True), cond, fake)


@pytest.mark.parametrize("head", list(DHead))
def test_spectral_norm_bounds_every_layer(head):
    torch.manual_seed(0)
    cfg = tiny(d_head=head)
    D = build_discriminator(cfg)
    layers = [m for m in D.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    norms = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in D.modules())
    with torch.no_grad():  # new weights, far from norm 1, unrelated to the stored u, v
        for m in layers:
            m.parametrizations.weight.original.normal_(0, 0.5)
        x = torch.randn(2, d_in_channels(cfg), 32, 32)
        for _ in range(50):  # one power iteration per training-mode forward
            D(x)
        D.eval()
        for m in layers:
            raw = torch.linalg.matrix_norm(m.parametrizations.weight.original.flatten(1), ord=2)
            sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
            assert raw > 2.5  # so the bound below is spectral norm's doing
            assert 0.999 < sigma < 1.02, (m, sigma)


def test_spectral_norm_weight_is_computed_outside_autocast():
    """Under autocast the power iteration (mv, dot) must not drop to low precision."""
    cfg = tiny()
    D = build_discriminator(cfg)
    states = []
    for m in D.modules():
        if parametrize.is_parametrized(m, "weight"):
            sn = m.parametrizations.weight[0]
            sn.register_forward_hook(lambda *_: states.append(torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D(torch.randn(1, d_in_channels(cfg), 32, 32))
    assert out.dtype == torch.bfloat16  # the convs themselves still autocast
    assert states and not any(states)


def test_patch_discriminator_sees_70x70_and_global_the_whole_frame():
    assert receptive_field("D", tiny(depth=5)) == 70
    assert receptive_field("D", tiny(d_head="global")) is None


def test_summary_lists_every_network(capsys):
    assert summary_main(["ngf=8", "ndf=8", "depth=3"]) == 0
    out = capsys.readouterr().out
    for name in ("G grey", "G lineart", "D patch (grey)", "D global (lineart)"):
        assert f"| {name} |" in out
    assert "| 70 px |" in out and "[1, 2, 480, 480]" in out


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_bad_frame_size_is_a_clear_error(mode):
    G = build_generator(tiny(mode=mode))
    msg = r"frame size 36x32 is not a multiple of 8 \(2\*\*depth, depth=3\)"
    with pytest.raises(ValueError, match=msg):
        if mode == Mode.grey:
            G(torch.zeros(1, 3, 1, 36, 32))
        else:
            G(torch.zeros(1, 1, 36, 32), torch.zeros(1, 4, 36, 32))
    for head in DHead:
        D = build_discriminator(tiny(mode=mode, d_head=head))
        with pytest.raises(ValueError, match=msg):
            D(torch.zeros(1, d_in_channels(tiny(mode=mode)), 36, 32))
    with pytest.raises(ValueError, match="patch D needs frames of at least 24x24"):
        build_discriminator(tiny(mode=mode))(torch.zeros(1, d_in_channels(tiny(mode=mode)), 16, 16))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(norm="layer"),
            "norm: unknown option 'layer'; expected one of: batch, instance, group",
        ),
        (dict(mode="rgb"), "mode: unknown option 'rgb'; expected one of: grey, lineart"),
        (dict(d_head="pixel"), "d_head: unknown option 'pixel'; expected one of: patch, global"),
        (dict(ngf=2), "ngf: must be >= 4"),
        (dict(depth=0), "depth: must be >= 1"),
        (dict(p_drop=1.5), r"p_drop: a probability, must lie in \[0, 1\]"),
        (dict(p_drop=0.8, scheduled_sampling=0.4), "scheduled_sampling: must be <= 1 - p_drop"),
    ],
)
def test_unknown_or_invalid_option_is_a_clear_error(change, message):
    for build in (build_generator, build_discriminator):
        with pytest.raises(ValueError, match=message):
            build(tiny(**change))


def test_wrong_input_shape_is_a_clear_error():
    G = build_generator(tiny())
    with pytest.raises(ValueError, match=r"expected shape \[B, 3, 1, H, W\], got \[2, 1, 32, 32\]"):
        G(torch.zeros(2, 1, 32, 32))


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_overfit_one_batch_trains_g_and_d(mode):
    """A few hundred G and D steps on one batch: the pixel loss falls far, D's weights move.

    Line-art mode also runs its training-time hint (black / own prediction / truth) and the
    temporal D.
    """
    torch.manual_seed(0)
    grey = mode == Mode.grey
    cfg = tiny(mode=mode, norm=Norm.instance, d_temporal=not grey, scheduled_sampling=0.25)
    G, D = build_generator(cfg), build_discriminator(cfg)
    loss = build_loss(LossConfig())
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=4e-4, betas=(0.5, 0.999))
    d_start = [p.detach().clone() for p in D.parameters()]
    cond, target = grey_batch(2) if grey else lineart_batch(2)
    real = target[:, 1]
    pixel = []
    for _ in range(300):
        own = None if grey else first_frame_colour(G, cond, mode, memory=True)
        fake = G(cond) if grey else G(cond[:, 1], previous_colour(cond, target, cfg, own=own))
        real_logits = D(assemble_d_input(cfg, cond, real, target))
        d = loss.d_loss(real_logits, D(assemble_d_input(cfg, cond, fake.detach(), target)))
        opt_d.zero_grad(set_to_none=True)
        d.total.backward()
        opt_d.step()
        D.requires_grad_(False)  # G's step must leave no gradient in D
        g = loss.g_loss(D(assemble_d_input(cfg, cond, fake, target)), fake, real)
        opt_g.zero_grad(set_to_none=True)
        g.total.backward()
        opt_g.step()
        D.requires_grad_(True)
        assert torch.isfinite(g.total) and torch.isfinite(d.total)
        pixel.append(g.pixel.item())
    assert pixel[-1] < 0.3 * pixel[0], (pixel[0], pixel[-1])
    moved = [(p - p0).abs().max().item() for p, p0 in zip(D.parameters(), d_start)]
    assert min(moved) > 0, "some D parameter never trained"


# --- recipe options: start at grey, pixel-only warm-up ------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_zero_init_head_starts_at_grey_then_trains_off_it(mode):
    """A fresh G outputs a = b = 0 exactly; the first step trains the head only (the rest
    sees its gradient through zero weights), the second every layer; then a,b are not 0."""
    torch.manual_seed(0)
    grey = mode == Mode.grey
    G = build_generator(tiny(mode=mode, norm=Norm.group, zero_init_head=True))
    cond, target = grey_batch(2) if grey else lineart_batch(2)
    run = (lambda: G(cond)) if grey else (lambda: G(cond[:, 1]))  # noqa: E731
    out = run()
    assert torch.equal(out[:, -2:], torch.zeros_like(out[:, -2:]))
    if not grey:  # line art: L is still predicted
        assert out[:, 0].abs().max() > 0
    opt = torch.optim.Adam(G.parameters(), lr=1e-3)
    head = {id(p) for p in G.decoder.head.parameters()}
    # line art trains with a memory, so its gate trains too (from its second step: the gate's
    # last layer starts at zero as well)
    train = run if grey else (lambda: G(cond[:, 1], memory_of(target[:, 0], cond[:, 0])))  # noqa: E731,E501
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        (train() - target[:, 1]).abs().mean().backward()
        moved = {id(p) for p in G.parameters() if p.grad is not None and p.grad.abs().max() > 0}
        if step == 0 and grey:
            assert moved == head
        elif step == 1:
            assert moved == {id(p) for p in G.parameters()}
        opt.step()
    assert run()[:, -2:].abs().max() > 1e-4
    # off by default: random chroma at step 0
    default = build_generator(tiny(mode=mode, norm=Norm.group))
    out = default(cond) if grey else default(cond[:, 1])
    assert out[:, -2:].abs().max() > 1e-2


def test_warm_up_in_train_step_pixel_only_until_adv_start_step(shards):
    """The trainer's step: before loss.adv_start_step G's loss is lambda_pixel * pixel (and D
    trains); from it the adversarial term is in. Logged as Loss/G/adv_weight."""
    from accelerate import Accelerator

    from trainer.config import load_config
    from trainer.data import Batch
    from trainer.step import train_step
    from trainer.train import build_gan

    torch.manual_seed(0)
    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "model.ngf=8",
                                            "model.ndf=8", "loss.adv_start_step=2"])
    accelerator = Accelerator(cpu=True)
    gan = build_gan(cfg, accelerator)
    cond, target = grey_batch(2)
    batch = Batch(cond, target, ["a", "b"])
    for step in range(3):
        d_before = [p.detach().clone() for p in gan.D.parameters()]
        out = train_step(accelerator, gan, batch, step)
        total, adv, pixel = (out[f"Loss/G/{k}"].item() for k in ("total", "adv", "pixel"))
        assert adv > 0 and "Loss/G/chroma" in out
        if step < 2:
            assert out["Loss/G/adv_weight"].item() == 0.0
            assert total == pytest.approx(20 * pixel, rel=1e-6)
        else:
            assert out["Loss/G/adv_weight"].item() == 1.0
            assert total == pytest.approx(adv + 20 * pixel, rel=1e-6)
        assert any(not torch.equal(a, b) for a, b in zip(d_before, gan.D.parameters()))
    with pytest.raises(ValueError, match="the step must be given"):
        train_step(accelerator, gan, batch)


@pytest.mark.slow
def test_warm_up_switches_on_at_its_step_across_a_resume(shards, tmp_path):
    """Two launches of the real trainer (in-process, 1 rank): 2 steps, then resumed to 4, with
    loss.adv_start_step=3. The step counter comes back from the checkpoint, so the term is
    off for trainer steps 0-2 and on for step 3 (logged at steps 1-3 and 4)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_trainer import run_args, run_main

    runs = tmp_path / "runs"
    for steps in (2, 4):
        args = run_args(shards, runs, f"train.max_steps={steps}", "loss.adv_start_step=3",
                        "train.val_every=0")
        assert run_main(args) == 0
    events = EventAccumulator(str(runs / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    # one entry per step: the second launch resumed at step 2 instead of starting over
    weights = [(e.step, e.value) for e in events.Scalars("Loss/G/adv_weight")]
    assert weights == [(1, 0.0), (2, 0.0), (3, 0.0), (4, 1.0)]
