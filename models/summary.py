"""Print each network's shapes, parameter count and receptive field at 64², 128², 256², 480².

    python -m models.summary                   # the default ModelConfig
    python -m models.summary ngf=32 depth=4    # any ModelConfig field as key=value

Both modes and both D heads are listed whatever `mode` and `d_head` say. Shapes come from a
forward pass on the "meta" device (no memory, no compute). The receptive field is measured,
not derived: on a narrow copy with normalization and activations removed and every weight
positive, the input pixels with a nonzero gradient for the centre output pixel are exactly
those the conv geometry lets it see.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from enum import Enum

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.config import DHead, Mode, ModelConfig
from models.discriminator import build_discriminator, d_in_channels
from models.generator import build_generator

SIZES = (64, 128, 256, 480)
_ERASE = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.LeakyReLU, nn.ReLU)


def example_inputs(kind: str, cfg: ModelConfig, size: int, **kw) -> list[Tensor]:
    """Inputs of G or D for one frame of size x size, batch 1; `kw` goes to torch.ones."""
    if kind == "D":
        return [torch.ones(1, d_in_channels(cfg), size, size, **kw)]
    if Mode(cfg.mode) == Mode.grey:  # L of t-1, t, t+1 (and the memory: a, b, present, L)
        memory = [torch.ones(1, 4, size, size, **kw)] if cfg.memory else []
        return [torch.ones(1, 3, 1, size, size, **kw), *memory]
    return [torch.ones(1, 1, size, size, **kw), torch.ones(1, 5, size, size, **kw)]


def build(kind: str, cfg: ModelConfig) -> nn.Module:
    return build_generator(cfg) if kind == "G" else build_discriminator(cfg)


def _linearize(net: nn.Module) -> nn.Module:
    """Same geometry, no cancellation: positive averaging weights, no norm/activation."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _ERASE):
                setattr(parent, name, nn.Identity())
    for m in list(net.modules()):
        if isinstance(m, nn.Conv2d | nn.Linear):
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight")
            with torch.no_grad():  # 1 / fan-in keeps activations O(1): no overflow
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return net.double().eval()


def footprint(cfg: ModelConfig, side: int, batch: int) -> dict[str, int]:
    """Parameter counts of G and D and the number of activation values one training step
    keeps for the backward (the output of every layer of G once and of D twice: on real
    and on G's colour), for `batch` frames of side x side. Counted on the "meta" device:
    nothing is allocated, so a model too large for any machine is measured, not built."""
    sizes = {}
    for kind in ("G", "D"):
        outputs = []

        def count(_module, _inputs, out, outputs=outputs):
            outputs.append(out.numel())

        with torch.device("meta"):
            net = build(kind, cfg)
            for m in net.modules():
                if not list(m.children()):
                    m.register_forward_hook(count)
            net(*example_inputs(kind, cfg, side))
        sizes[f"{kind}_params"] = sum(p.numel() for p in net.parameters())
        sizes[f"{kind}_activations"] = sum(outputs) * batch * (1 if kind == "G" else 2)
    return sizes


def receptive_field(kind: str, cfg: ModelConfig) -> int | None:
    """Side in pixels of the input window that one output pixel sees; None: the whole frame.

    For G it is measured on the line art or the centre frame's L.
    """
    net = _linearize(build(kind, replace(cfg, ngf=4, ndf=4)))  # the width changes nothing
    size = 2**cfg.depth * max(1, 128 // 2**cfg.depth)
    while True:  # grow the canvas until the window no longer touches its border
        inputs = [x.requires_grad_() for x in example_inputs(kind, cfg, size, dtype=torch.float64)]
        out = net(*inputs)
        if out.ndim == 2:  # [B, 1]: one logit per frame
            return None
        centre = out[0, 0, out.shape[2] // 2, out.shape[3] // 2]
        (grad,) = torch.autograd.grad(centre, inputs[0])
        grad = grad[0, 1, 0] if grad.ndim == 5 else grad[0, 0]  # [size, size]
        rows = grad.abs().sum(dim=1).nonzero()
        if rows.min() > 0 and rows.max() < size - 1:
            return int(rows.max() - rows.min() + 1)
        size *= 2


def _shape(t: Tensor, symbolic: bool = False) -> str:
    """[1, 3, 64, 64], or [1, 3, S, S] with `symbolic` (S: the frame side)."""
    dims = list(t.shape[:-2]) + (["S", "S"] if symbolic else list(t.shape[-2:]))
    return "[" + ", ".join(map(str, dims)) + "]"


def _text(value: object) -> str:
    return str(value.value if isinstance(value, Enum) else value)


def table(cfg: ModelConfig) -> str:
    """A markdown table, one row per network; S is the frame side, batch size 1."""
    nets = []
    for mode in Mode:
        nets.append((f"G {mode.value}", "G", replace(cfg, mode=mode)))
        nets += [
            (f"D {h.value} ({mode.value})", "D", replace(cfg, mode=mode, d_head=h)) for h in DHead
        ]
    sizes = [s for s in SIZES if s % 2**cfg.depth == 0]  # the others are errors by design
    head = " | ".join(f"output at {s}²" for s in sizes)
    rows = [
        f"| network | input | params | receptive field | {head} |",
        "|---" * 4 + "|---" * len(sizes) + "|",
    ]
    for name, kind, c in nets:
        outputs = []
        for size in sizes:
            with torch.device("meta"):
                net = build(kind, c)
                outputs.append(_shape(net(*example_inputs(kind, c, size))))
        inputs = " + ".join(_shape(x, True) for x in example_inputs(kind, c, 1, device="meta"))
        params = sum(p.numel() for p in net.parameters())
        rf = receptive_field(kind, c)
        rf_text = "whole frame" if rf is None else f"{rf} px"
        rows.append(f"| {name} | {inputs} | {params:,} | {rf_text} | {' | '.join(outputs)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as e:  # its message names the key and the choices
        print(f"models.summary: {e}", file=sys.stderr)
        return 2
    cfg: ModelConfig = OmegaConf.to_object(merged)
    keys = ("ngf", "depth", "norm", "temporal", "ndf", "d_conditional", "d_temporal")
    print("ModelConfig: " + ", ".join(f"{k}={_text(getattr(cfg, k))}" for k in keys) + "\n")
    print(table(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
