"""Discriminators: spectral norm on every layer, no normalization layers, logits out.

D's input is assembled by `assemble_d_input` from the "colour" (what G outputs: a,b in grey
mode, Lab in line-art mode; or the real one) and, optionally, the condition (G's input) and
the real neighbour frames. C = 2 (grey) or 3 (line art):

    d_conditional  d_temporal  per frame               frames        input
    True           False       condition ++ colour     t             [B, 1 + C, H, W]
    False          False       colour                  t             [B, C, H, W]
    True           True        condition ++ colour     t-1, t, t+1   [B, 3 (1 + C), H, W]
    False          True        colour                  t-1, t, t+1   [B, 3 C, H, W]

(In grey mode "condition ++ colour" of a frame is its Lab: D judges the a,b given the L.)

Heads, logits without sigmoid (safe under autocast; the losses apply it in fp32):
    patch   [B, c_in, H, W] -> [B, 1, H/8 - 2, W/8 - 2]   pix2pix's 70x70 PatchGAN
    global  [B, c_in, H, W] -> [B, 1]                     depth stride-2 convs, mean, 2 FC
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.blocks import check_frame_size, lrelu, sn_conv, sn_linear
from models.config import DHead, Mode, ModelConfig, check_model_config, choice

_COLOUR_CHANNELS = {Mode.grey: 2, Mode.lineart: 3}
PATCH_MIN_SIZE = 24  # smaller frames leave the PatchGAN's last conv no output pixel


def d_in_channels(cfg: ModelConfig) -> int:
    per_frame = _COLOUR_CHANNELS[choice(Mode, cfg.mode, "mode")] + int(cfg.d_conditional)
    return per_frame * (3 if cfg.d_temporal else 1)


def assemble_d_input(
    cfg: ModelConfig, condition: Tensor, colour: Tensor, target: Tensor | None = None
) -> Tensor:
    """D's input [B, c_in, H, W] for a real or generated colour frame t.

    condition [B, 3, 1, H, W]; colour [B, C, H, W]; target [B, 3, C, H, W], the real
    triplet, needed by the temporal D only: its frames t-1 and t+1 surround `colour`, so a
    fake triplet differs from the real one in frame t only.
    """
    if cfg.d_temporal:
        if target is None:
            raise ValueError("the temporal D (d_temporal=True) needs the real triplet `target`")
        frames = torch.stack([target[:, 0], colour, target[:, 2]], dim=1)  # [B, 3, C, H, W]
        cond = condition  # [B, 3, 1, H, W]
    else:
        frames, cond = colour.unsqueeze(1), condition[:, 1:2]  # [B, 1, C, H, W], [B, 1, 1, H, W]
    if cfg.d_conditional:
        frames = torch.cat([cond.to(frames.dtype), frames], dim=2)  # [B, T, 1 + C, H, W]
    return frames.flatten(1, 2)


class PatchDiscriminator(nn.Module):
    """pix2pix's n_layers=3 D: each logit judges one 70x70 patch, so it runs at any size."""

    def __init__(self, c_in: int, ndf: int, depth: int):
        super().__init__()
        self.depth = depth
        chans = [c_in, ndf, 2 * ndf, 4 * ndf, 8 * ndf]
        layers: list[nn.Module] = []
        for a, b, stride in zip(chans, chans[1:], (2, 2, 2, 1)):  # H/2, H/4, H/8, H/8 - 1
            layers += [sn_conv(a, b, 4, stride), lrelu()]
        self.net = nn.Sequential(*layers, sn_conv(8 * ndf, 1, 4, 1))  # H/8 - 2

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        check_frame_size(h, w, self.depth)
        if min(h, w) < PATCH_MIN_SIZE:
            raise ValueError(
                f"frame size {h}x{w}: the patch D needs frames of at least "
                f"{PATCH_MIN_SIZE}x{PATCH_MIN_SIZE}; use larger crops or model.d_head=global"
            )
        return self.net(x)


class GlobalDiscriminator(nn.Module):
    """One logit per frame: an encoder, a global mean, two fully connected layers.

    The 3-frame GAN flattened a fixed-size feature map into its FC layer, so it ran at
    224 or 480 only; the mean over positions makes it work at any supported size.
    """

    def __init__(self, c_in: int, ndf: int, depth: int):
        super().__init__()
        self.depth = depth
        chans = [c_in] + [ndf * min(2**i, 8) for i in range(depth)]
        layers: list[nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [sn_conv(a, b, 4, 2), lrelu()]  # H / 2**depth at the end: >= 1 pixel
        self.encoder = nn.Sequential(*layers)
        self.fc = nn.Sequential(sn_linear(chans[-1], chans[-1]), lrelu(), sn_linear(chans[-1], 1))

    def forward(self, x: Tensor) -> Tensor:
        check_frame_size(*x.shape[-2:], self.depth)
        return self.fc(self.encoder(x).mean(dim=(2, 3)))  # [B, c] -> [B, 1]


def build_discriminator(cfg: ModelConfig) -> PatchDiscriminator | GlobalDiscriminator:
    check_model_config(cfg)
    head = choice(DHead, cfg.d_head, "d_head")
    cls = PatchDiscriminator if head == DHead.patch else GlobalDiscriminator
    return cls(d_in_channels(cfg), cfg.ndf, cfg.depth)
