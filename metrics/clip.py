"""Per-clip scores: PSNR, SSIM, CDC, colourfulness, CIEDE2000 (conventions: the package doc)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from models.colour import rgb_to_cielab

PSNR_CAP_DB = 100.0
CDC_DILATIONS = (1, 2, 4)


def clip_psnr(pred: Tensor, truth: Tensor) -> Tensor:
    """PSNR in dB of each clip [B, T, C, H, W] in [0, 1] -> [B], capped at `PSNR_CAP_DB`."""
    psnr = peak_signal_noise_ratio(pred, truth, data_range=1.0, reduction="none",
                                   dim=tuple(range(1, pred.ndim)))
    return psnr.clamp(max=PSNR_CAP_DB)


def clip_ssim(pred: Tensor, truth: Tensor) -> Tensor:
    """SSIM of each clip [B, T, 3, H, W] in [0, 1] (the mean over its frames) -> [B]."""
    ssim = structural_similarity_index_measure(pred.flatten(0, 1), truth.flatten(0, 1),
                                               data_range=1.0, reduction="none")
    return ssim.view(pred.shape[:2]).mean(dim=1)


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] -> 8-bit levels round(255 x), as int64."""
    return (x.clamp(0, 1) * 255).round().long()


def histograms(video: Tensor) -> Tensor:
    """P_c(O_t): [..., C, H, W] in [0, 1] -> [..., C, 256], each row summing to 1."""
    *lead, H, W = video.shape
    levels = to_uint8(video).flatten(-2)  # [..., C, HW]
    rows = levels.flatten(0, -2).shape[0]
    offsets = torch.arange(rows, device=video.device).view(*lead, 1) * 256
    index = (levels + offsets).flatten()
    # A scatter into a fixed number of bins: torch.bincount on CUDA reads the largest index on
    # the host to size its output (a sync per call).
    counts = torch.zeros(rows * 256, dtype=torch.int64, device=video.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts.view(*lead, 256).float() / (H * W)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence in nats over the last dim (0 log 0 = 0), in [0, ln 2]."""
    m = (p + q) / 2

    def kl_to_m(a: Tensor) -> Tensor:  # where a > 0, m > 0 too
        return torch.where(a > 0, a * (a / m).log(), torch.zeros_like(a)).sum(dim=-1)

    return (kl_to_m(p) + kl_to_m(q)) / 2


def clip_cdc(video: Tensor) -> Tensor:
    """CDC of each clip [B, T, 3, H, W] in [0, 1] -> [B], over the dilations d < T."""
    T = video.shape[1]
    dilations = [d for d in CDC_DILATIONS if d < T]
    assert dilations, "CDC needs at least two frames"
    hist = histograms(video)  # [B, T, 3, 256]
    # JS over the pairs (i, i + d), mean over i: CDC_{c,d} [B, 3]; mean over d, then over c.
    per_dilation = [js_divergence(hist[:, :-d], hist[:, d:]).mean(dim=1) for d in dilations]
    return torch.stack(per_dilation).mean(dim=0).mean(dim=-1)


# --- colourfulness and CIEDE2000 -----------------------------------------------------------
# Conventions: both take RGB in [0, 1] (as everything above); colourfulness scales it to
# [0, 255] without rounding; CIEDE2000 converts sRGB (D65) to CIELAB with kornia, the same
# conversion as the data pipeline, and is computed in fp64.


def colourfulness(rgb: Tensor) -> Tensor:
    """Hasler & Süsstrunk's M of each image [..., 3, H, W] RGB in [0, 1] -> [...] (fp64).

    On [0, 255]: rg = R - G, yb = (R + G) / 2 - B (signed); sigma = sqrt(var rg + var yb)
    (population variances over the pixels), mu = sqrt(mean rg^2 + mean yb^2),
    M = sigma + 0.3 mu.
    """
    R, G, B = (rgb.double() * 255).unbind(dim=-3)
    rg, yb = (R - G).flatten(-2), ((R + G) / 2 - B).flatten(-2)
    sigma = (rg.var(dim=-1, unbiased=False) + yb.var(dim=-1, unbiased=False)).sqrt()
    mu = (rg.mean(dim=-1).square() + yb.mean(dim=-1).square()).sqrt()
    return sigma + 0.3 * mu


def ciede2000(lab1: Tensor, lab2: Tensor) -> Tensor:
    """CIEDE2000 colour difference (Sharma, Wu & Dalal 2005; k_L = k_C = k_H = 1) between
    CIELAB images in CIE units [..., 3, H, W] -> [..., H, W], computed in fp64."""
    L1, a1, b1 = lab1.double().unbind(dim=-3)
    L2, a2, b2 = lab2.double().unbind(dim=-3)
    c_bar7 = ((a1.hypot(b1) + a2.hypot(b2)) / 2).pow(7)
    g = 0.5 * (1 - (c_bar7 / (c_bar7 + 25.0**7)).sqrt())
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = a1p.hypot(b1), a2p.hypot(b2)
    # Hue angles in degrees in [0, 360); atan2(0, 0) = 0, as the paper sets it.
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360
    chroma_zero = (c1p * c2p) == 0

    dh = h2p - h1p
    dh = torch.where(dh > 180, dh - 360, torch.where(dh < -180, dh + 360, dh))
    dh = torch.where(chroma_zero, torch.zeros_like(dh), dh)
    dL, dC = L2 - L1, c2p - c1p
    dH = 2 * (c1p * c2p).sqrt() * torch.sin(torch.deg2rad(dh) / 2)

    L_bar, c_bar_p = (L1 + L2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_bar = torch.where((h1p - h2p).abs() <= 180, h_sum / 2,
                        torch.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_bar = torch.where(chroma_zero, h_sum, h_bar)

    def cos_deg(x: Tensor) -> Tensor:
        return torch.cos(torch.deg2rad(x))

    T = (1 - 0.17 * cos_deg(h_bar - 30) + 0.24 * cos_deg(2 * h_bar)
         + 0.32 * cos_deg(3 * h_bar + 6) - 0.20 * cos_deg(4 * h_bar - 63))
    d_theta = 30 * torch.exp(-(((h_bar - 275) / 25).square()))
    c_bar_p7 = c_bar_p.pow(7)
    R_C = 2 * (c_bar_p7 / (c_bar_p7 + 25.0**7)).sqrt()
    S_L = 1 + 0.015 * (L_bar - 50).square() / (20 + (L_bar - 50).square()).sqrt()
    S_C = 1 + 0.045 * c_bar_p
    S_H = 1 + 0.015 * c_bar_p * T
    R_T = -torch.sin(torch.deg2rad(2 * d_theta)) * R_C
    tL, tC, tH = dL / S_L, dC / S_C, dH / S_H
    return (tL.square() + tC.square() + tH.square() + R_T * tC * tH).clamp(min=0).sqrt()


def mean_ciede2000(pred: Tensor, truth: Tensor) -> Tensor:
    """Mean CIEDE2000 over the pixels of each RGB image [..., 3, H, W] in [0, 1] -> [...]."""
    return ciede2000(rgb_to_cielab(pred), rgb_to_cielab(truth)).mean(dim=(-2, -1))
