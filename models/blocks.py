"""Building blocks shared by G and D: conv blocks, normalization, spectral-norm layers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from models.config import Norm


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Run the block in the tensors' own precision whatever the surrounding autocast state."""
    if torch.amp.is_autocast_available(device_type):  # False for "meta" (shape-only runs)
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def check_frame_size(h: int, w: int, depth: int) -> None:
    """A user error, not an invariant: say which size fails and what would work."""
    m = 2**depth
    if h % m or w % m or h < m or w < m:
        near = f"{max(m, h // m * m)}x{max(m, w // m * m)}"
        raise ValueError(
            f"frame size {h}x{w} is not a multiple of {m} (2**depth, depth={depth}); crop or "
            f"resize frames to multiples of {m} (e.g. {near}) or lower model.depth"
        )


def lrelu() -> nn.Module:
    """LeakyReLU(0.2), the DCGAN/pix2pix slope, for encoders and D."""
    return nn.LeakyReLU(0.2)


def norm_layer(norm: Norm, channels: int) -> nn.Module:
    if norm == Norm.batch:
        return nn.BatchNorm2d(channels)
    if norm == Norm.instance:
        # affine: without a learned scale/shift the layer could only whiten features
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == Norm.group:
        # gcd keeps any width valid; 32 groups is the GroupNorm paper's default
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise AssertionError(f"unhandled norm {norm!r}")  # config.choice rejects the rest


def conv_block(
    c_in: int, c_out: int, kernel: int, stride: int, norm: Norm | None, act: nn.Module
) -> nn.Sequential:
    """conv -> norm -> act; padding 1: kernel 4 / stride 2 halves the size, 3 / 1 keeps it."""
    # no conv bias before a normalization layer: its mean subtraction cancels the bias
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, 1, bias=norm is None)]
    if norm is not None:
        layers.append(norm_layer(norm, c_out))
    layers.append(act)
    return nn.Sequential(*layers)


class _FP32Weight:
    """Computes a spectrally normalized weight with autocast off.

    Under CUDA autocast the power iteration's mv/dot would run in fp16 and so would sigma,
    the value every D weight is divided by. Only the weight is computed in fp32; the conv or
    matmul that uses it still autocasts.
    """

    def fp32_weight(self, x: Tensor) -> Tensor:
        with autocast_off(x.device.type):
            return self.weight


class SNConv2d(_FP32Weight, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.fp32_weight(x), self.bias)


class SNLinear(_FP32Weight, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fp32_weight(x), self.bias)


def sn_conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Module:
    """Padding 1 as in pix2pix: kernel 4 / stride 2 halves the size, stride 1 takes 1 off."""
    return spectral_norm(SNConv2d(c_in, c_out, kernel, stride, 1))


def sn_linear(c_in: int, c_out: int) -> nn.Module:
    return spectral_norm(SNLinear(c_in, c_out))
