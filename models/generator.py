"""Generators: one U-Net family, in the two modes of the seeds.

Shapes for B clips of H x W frames; c_i = ngf * min(2**(i-1), 8) channels at scale 1/2**i,
i = 1..depth: the 3-frame GAN's widths (ngf, 2, 4, 8, 8 ngf at 1/2 .. 1/32), so `ngf 64` means
the same network size in both codebases.

Grey mode (the 3-frame GAN), `GreyUNet`:
    condition     [B, 3, 1, H, W]       L of frames t-1, t, t+1, in [-1, 1]
    Encoder       [B, c_i, H/2**i, W/2**i], i = 1..depth, 3x3 stride-2 convs; one weight set:
                  frame t in one pass (its features are the skips), t-1 and t+1 in another
                  (only their bottlenecks are used)
    Fusion        [B, c_d, H/2**d, W/2**d]   per-frame 1x1 projections (t: half the channels,
                                             t-1 and t+1 a quarter each), concat, 3x3 conv
    Decoder       [B, c_1, H/2, W/2]    per stage: 3x3 conv at the low resolution, bilinear
                                        upsampling, add the skip of frame t
    head, tanh    [B, 2, H, W]          3x3 conv to min(c_1, 32) channels, upsample, concat
                                        the full-resolution L of frame t, 3x3 conv:
                                        a,b of frame t in [-1, 1]
                                        (`zero_init_head`: a,b rows start at 0, so
                                        a fresh G outputs a = b = 0 exactly)
The colour frame is the input L with these a,b (`colour.compose_lab`): luminance is kept
exactly, G only has to find chroma.

Line-art mode (TCVC), `LineartUNet`:
    line art of t [B, 1, H, W]
    Encoder -> Fusion (one frame: 1x1 + 3x3) -> Decoder -> head on that input   Lab of t

Colour memory (line-art mode; grey mode with `model.memory`; models/memory.py): the colour
of frame t-1, a `present` channel and frame t-1's condition, [B, C + 2, H, W]. `MemoryGate`
finds each pixel's previous colour within 4 pixels (attention between learned keys of the
two frames' conditions, at half resolution) and blends it into the head's output with a
learned per-pixel gate: out = auto + g (found - auto), g in [0, 1]. Only averages of
existing colours, so a recurrence cannot amplify colour (the drift measured when the memory
went into the encoder instead: docs/quality-explored.md).

Where the FLOPs go (bench/step.py measures it): every conv but the last runs at half
resolution or lower; at full resolution there are only the head's inputs (32 + 1 channels)
and its output, and with colour memory the gate's two small convs (16 channels).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import check_frame_size, conv_block, lrelu
from models.config import Mode, ModelConfig, Norm, check_model_config, choice, has_memory


def widths(ngf: int, depth: int) -> list[int]:
    """Channels c_1..c_depth; capped at 8 * ngf as in pix2pix, the deep stages are tiny."""
    return [ngf * min(2**i, 8) for i in range(depth)]


# Channels upsampled to full resolution for the head. There memory traffic, not FLOPs, sets
# the cost: G forward + backward at ngf 64, 128², batch 8, one core took 1.69 s with 64
# channels, 1.48 s with 32, 1.37 s with 16 (the 3-frame GAN's G: 1.16 s). Predicting a,b at half
# resolution and refining only those at full resolution was cheaper still, but scored 27.8 dB
# PSNR / 0.941 SSIM on the demo's validation against 29.8 dB / 0.967 for this head (one run
# each, 600 steps; runs with other seeds spread by about 2 dB). How each figure was measured:
# docs/benchmarks.md, "One-off measurements".
HEAD_CHANNELS = 32


def upsample(x: Tensor) -> Tensor:
    """x2, bilinear: smooth, so no checkerboard artefacts (Odena et al. 2016), which would
    flicker as they move from frame to frame."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class Encoder(nn.Module):
    """[N, c_in, H, W] -> features [N, c_i, H/2**i, W/2**i] for i = 1..depth."""

    def __init__(self, c_in: int, chans: list[int], norm: Norm):
        super().__init__()
        # No normalization on the stem: on raw input it would erase each frame's mean
        # brightness, a strong cue for colour (sky, shadow).
        self.stem = conv_block(c_in, chans[0], 3, 2, None, lrelu())
        self.down = nn.ModuleList(
            conv_block(a, b, 3, 2, norm, lrelu()) for a, b in zip(chans, chans[1:])
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stem(x)]
        for block in self.down:
            feats.append(block(feats[-1]))
        return feats


class Fusion(nn.Module):
    """Bottleneck features of n frames [B, n, c, h, w] -> [B, c, h, w].

    Each frame position has its own 1x1 projection, so the network knows which frame is
    which; with three frames the centre one gets half the channels, since frame t is the
    one being coloured and its neighbours only disambiguate it.
    """

    def __init__(self, c: int, n_frames: int, norm: Norm):
        super().__init__()
        shares = [c // 4, c - 2 * (c // 4), c // 4] if n_frames == 3 else [c]
        self.proj = nn.ModuleList(nn.Conv2d(c, s, 1) for s in shares)
        self.mix = conv_block(c, c, 3, 1, norm, lrelu())

    def forward(self, feats: Tensor) -> Tensor:
        return self.mix(torch.cat([p(feats[:, k]) for k, p in enumerate(self.proj)], dim=1))


class Decoder(nn.Module):
    """Bottleneck [B, c_d, H/2**d, W/2**d], skips [B, c_i, H/2**i, W/2**i] (i < d) and the
    full-resolution input [B, c_in, H, W] -> the head's features; `colour` makes them
    [B, c_out, H, W], tanh, in [-1, 1] like the normalized Lab targets.

    Each stage convolves before it upsamples (the cost of the 3-frame GAN's stride-2
    transposed conv, a quarter of upsample-then-convolve) and adds its skip, as that GAN does.
    A last block at
    half resolution processes the finest skip (the 3-frame GAN's output layer sees it only
    linearly); the head then sees its features upsampled next to the input itself at full
    resolution, so output edges can follow the input's edges.
    """

    def __init__(self, chans: list[int], c_in: int, c_out: int, norm: Norm):
        super().__init__()
        self.up = nn.ModuleList(
            conv_block(chans[i], chans[i - 1], 3, 1, norm, nn.ReLU())
            for i in range(len(chans) - 1, 0, -1)
        )
        c_head = min(chans[0], HEAD_CHANNELS)
        self.last = conv_block(chans[0], c_head, 3, 1, norm, nn.ReLU())
        self.head = nn.Conv2d(c_head + c_in, c_out, 3, 1, 1)

    def start_at_grey(self) -> None:
        """Zero the weights and bias of the head's a,b outputs (its last two channels), so
        they are tanh(0) = 0 whatever the input: G starts at the grey frame, the L1 optimum
        of knowing nothing, instead of random chroma. At the first step only these rows get
        a gradient (the layers before see them through zero weights); from the second step
        every layer does."""
        with torch.no_grad():
            self.head.weight[-2:].zero_()
            self.head.bias[-2:].zero_()

    def forward(self, x: Tensor, skips: list[Tensor], full_res: Tensor) -> Tensor:
        """The head's input [B, c_head + c_in, H, W]: decoded features next to the input
        (`colour` turns it into the output; the memory gate reads it too)."""
        for block, skip in zip(self.up, reversed(skips)):
            x = upsample(block(x)) + skip
        return torch.cat([upsample(self.last(x)), full_res], dim=1)

    def colour(self, features: Tensor) -> Tensor:
        return torch.tanh(self.head(features))


class MemoryGate(nn.Module):
    """Colour memory, found where it moved and blended in: out = auto + g (found - auto).

    memory [B, C + 2, H, W]: the previous frame's colour (C channels), `present` (1, or 0 for
    none) and the previous frame's condition (its L or line art); frame [B, 1, H, W]: this
    frame's condition; auto [B, C, H, W]: G's colour without memory.

    1. Found: each pixel looks for its previous colour in a WINDOW x WINDOW neighbourhood of
       the previous frame at half resolution (motion up to 4 pixels per frame), by
       attention on the distance between learned keys of the two conditions (a small conv
       net, shared); the
       found colour is the attention-weighted mean of the present colours there (weights
       renormalized over present pixels), `present` its weight. A per-offset bias starts the
       attention at "no motion".
    2. Blended: g in [0, 1] per pixel, from the head's features, auto and what was found.

    Both steps only average colours that exist, so the output never leaves the range of G's
    own colour and the memory's: a recurrence of such blends can fade towards G's colour but
    cannot amplify it -- the drift into saturated blobs that a memory fed into the network's
    input showed (docs/quality-explored.md).
    """

    WINDOW = 5  # at half resolution: motion up to 4 pixels per frame at the working size
    KEYS = 8

    def __init__(self, c_features: int, c_colour: int, hidden: int = 16):
        super().__init__()
        w, k = self.WINDOW, self.KEYS
        self.key = nn.Sequential(nn.Conv2d(1, k, 3, 1, 1), lrelu(), nn.Conv2d(k, k, 3, 1, 1))
        offset_bias = torch.zeros(w * w)
        offset_bias[w * w // 2] = 4.0  # the centre: the same pixel in the previous frame
        self.offset_bias = nn.Parameter(offset_bias)
        self.net = nn.Sequential(nn.Conv2d(c_features + 2 * c_colour + 1, hidden, 3, 1, 1),
                                 nn.ReLU(), nn.Conv2d(hidden, 1, 3, 1, 1))
        nn.init.zeros_(self.net[-1].weight)  # the blend starts at 1/2
        nn.init.zeros_(self.net[-1].bias)

    def _neighbours(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, WINDOW**2, H, W]: each pixel's window (zeros outside)."""
        b, c, h, w = x.shape
        return F.unfold(x, self.WINDOW, padding=self.WINDOW // 2).view(b, c, -1, h, w)

    def find(self, frame: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """(found colour [B, C, H, W], its presence [B, 1, H, W]).

        Searched at half resolution (chroma is smooth; a quarter of the pixels, and the
        window reaches twice as far), then upsampled: at full resolution a training run took
        2.5x as long as without memory (docs/quality-explored.md)."""
        colour, present, prev_frame = memory[:, :-2], memory[:, -2:-1], memory[:, -1:]
        half = functools.partial(F.avg_pool2d, kernel_size=2)
        q, k = self.key(half(frame)), self._neighbours(self.key(half(prev_frame)))
        # like pixels match: minus the squared key distance (a dot product favours large keys)
        logits = -(q.unsqueeze(2) - k).square().sum(1) / self.KEYS**0.5  # [B, w², h, w]
        logits = logits + self.offset_bias[:, None, None]
        # window positions outside the frame are not candidates (else the border would read
        # as missing memory, and a keyframe's colour would fade there frame after frame)
        inside = self._neighbours(torch.ones_like(q[:1, :1]))[:, 0] > 0  # [1, w², h, w]
        logits = logits.masked_fill(~inside, float("-inf"))
        weight = torch.softmax(logits, dim=1).unsqueeze(1)  # [B, 1, w², h, w]
        premultiplied = half(torch.cat([colour * present, present], dim=1))
        mass = (self._neighbours(premultiplied) * weight).sum(2)  # [B, C + 1, h, w]
        mass = F.interpolate(mass, size=frame.shape[-2:], mode="bilinear", align_corners=False)
        presence = mass[:, -1:]
        return mass[:, :-1] / presence.clamp(min=1e-6), presence.clamp(max=1.0)

    def forward(self, features: Tensor, frame: Tensor, auto: Tensor, memory: Tensor) -> Tensor:
        memory = memory.to(auto.dtype)
        colour, present = self.find(frame.to(auto.dtype), memory)
        g = torch.sigmoid(self.net(torch.cat([features, auto, colour, present], dim=1)))
        return auto + g * present * (colour - auto)


def _expect(x: Tensor, tail: tuple[int, ...], what: str) -> None:
    if x.ndim != len(tail) + 3 or tuple(x.shape[1 : 1 + len(tail)]) != tail:
        dims = ", ".join(["B", *map(str, tail), "H", "W"])
        raise ValueError(f"{what}: expected shape [{dims}], got {list(x.shape)}")


def memory_gate(cfg: ModelConfig, chans: list[int], c_in: int,
                c_colour: int) -> MemoryGate | None:
    """The gate of a G with colour memory (not of the per-frame control, which never gets
    a colour: it would hold parameters that never train)."""
    if not (has_memory(cfg) and cfg.temporal):
        return None
    return MemoryGate(min(chans[0], HEAD_CHANNELS) + c_in, c_colour)


def gated(gate: MemoryGate | None, features: Tensor, frame: Tensor, auto: Tensor,
          memory: Tensor | None, temporal: bool, what: str) -> Tensor:
    """G's output: `auto`, or with a memory given to a G that has one, the gated blend."""
    if memory is not None:
        _expect(memory, (auto.shape[1] + 2,), what)
    if gate is None or memory is None or not temporal:  # per-frame: never a colour hint
        return auto
    return gate(features, frame, auto, memory)


class GreyUNet(nn.Module):
    """G(condition [B, 3, 1, H, W]) -> a,b of the centre frame [B, 2, H, W].

    With `memory` (`model.memory`), G(condition, memory [B, 4, H, W]): the (a, b, present, L)
    of frame t-1 (models/memory.py), found and blended in by the `MemoryGate`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = choice(Norm, cfg.norm, "norm")
        chans = widths(cfg.ngf, cfg.depth)
        self.depth, self.temporal, self.memory = cfg.depth, cfg.temporal, bool(cfg.memory)
        self.encoder = Encoder(1, chans, norm)
        self.fusion = Fusion(chans[-1], 3, norm)
        self.decoder = Decoder(chans, 1, 2, norm)
        self.gate = memory_gate(cfg, chans, 1, 2)
        if cfg.zero_init_head:
            self.decoder.start_at_grey()

    def forward(self, condition: Tensor, memory: Tensor | None = None) -> Tensor:
        _expect(condition, (3, 1), "grey-mode condition (L of frames t-1, t, t+1)")
        check_frame_size(*condition.shape[-2:], self.depth)
        if memory is not None and not self.memory:
            raise ValueError("this grey-mode G has no colour memory (model.memory=false): "
                             "it takes no previous colour")
        centre = condition[:, 1]  # [B, 1, H, W]
        feats = self.encoder(centre)  # [B, c_i, h_i, w_i], i = 1..depth
        if self.temporal:
            # t-1 and t+1 through the same encoder, folded into one batch. A pass apart from
            # frame t: the skips are then whole tensors, and no backward has to scatter their
            # gradient into a 3-frame buffer. (BatchNorm statistics are per pass, as in the
            # seed, which encodes each frame on its own.)
            neighbours = self.encoder(condition[:, 0::2].flatten(0, 1))[-1].unflatten(0, (-1, 2))
            bottlenecks = torch.stack([neighbours[:, 0], feats[-1], neighbours[:, 1]], dim=1)
        else:
            # Per-frame ablation: frame t stands in for its neighbours. Same modules and
            # parameter count, so the baseline differs only in what it sees.
            bottlenecks = feats[-1].unsqueeze(1).expand(-1, 3, -1, -1, -1)
        x = self.fusion(bottlenecks)  # [B, c_d, h_d, w_d]
        h = self.decoder(x, feats[:-1], centre)  # skips from frame t only
        return gated(self.gate, h, centre, self.decoder.colour(h), memory, self.temporal,
                     "colour memory of frame t-1 (a, b, present, L)")


class LineartUNet(nn.Module):
    """G(line art of t [B, 1, H, W], memory [B, 5, H, W]) -> Lab of t [B, 3, H, W].

    The memory is the (L, a, b, present, line art) of frame t-1 (models/memory.py), found and
    blended in by the `MemoryGate`; TCVC fed the previous colour into the network's
    input instead, which drifted (docs/quality-explored.md)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = choice(Norm, cfg.norm, "norm")
        chans = widths(cfg.ngf, cfg.depth)
        self.depth, self.temporal, self.memory = cfg.depth, cfg.temporal, True
        self.encoder = Encoder(1, chans, norm)
        self.fusion = Fusion(chans[-1], 1, norm)
        self.decoder = Decoder(chans, 1, 3, norm)
        self.gate = memory_gate(cfg, chans, 1, 3)
        if cfg.zero_init_head:  # a,b only: L has no grey answer to start from
            self.decoder.start_at_grey()

    def forward(self, lineart: Tensor, memory: Tensor | None = None) -> Tensor:
        _expect(lineart, (1,), "line art of frame t")
        check_frame_size(*lineart.shape[-2:], self.depth)
        feats = self.encoder(lineart)
        x = self.fusion(feats[-1].unsqueeze(1))
        h = self.decoder(x, feats[:-1], lineart)
        return gated(self.gate, h, lineart, self.decoder.colour(h), memory, self.temporal,
                     "colour memory of frame t-1 (L, a, b, present, line art)")


def build_generator(cfg: ModelConfig) -> GreyUNet | LineartUNet:
    check_model_config(cfg)
    mode = choice(Mode, cfg.mode, "mode")
    return GreyUNet(cfg) if mode == Mode.grey else LineartUNet(cfg)
