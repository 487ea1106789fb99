"""Line art: Canny with a fixed number of hysteresis rounds equals kornia's hysteresis (which
loops until nothing changes, reading `.any()` on the host each round) on real frames, and reads
nothing on the host."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import kornia
import numpy as np
import pytest
import torch

from models.colour import HYSTERESIS_ROUNDS, line_art, rgb_to_lab_triplets
from shards.video import sample_video

LOW, HIGH = 0.1, 0.2  # DataConfig's defaults
# Measured over 84 frames at 128^2 (0 differ) and 33 at 480^2 (at most 7.5e-5 of the pixels
# of a clip, 6.3e-4 of one frame): see HYSTERESIS_ROUNDS.
MAX_DIFFERING = {128: 1e-4, 480: 7e-4}


def centre_crops(name: str, side: int, frames: int, every: int) -> torch.Tensor:
    """`frames` frames of a bundled clip, one in `every`, short side resized to `side` and
    centre-cropped to side^2: uint8 RGB [N, side, side, 3]."""
    out = []
    with av.open(str(sample_video(name))) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % every:
                continue
            scale = side / min(frame.width, frame.height)
            rgb = frame.reformat(round(frame.width * scale), round(frame.height * scale),
                                 format="rgb24").to_ndarray()
            y, x = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
            out.append(rgb[y:y + side, x:x + side])
            if len(out) == frames:
                break
    return torch.from_numpy(np.stack(out))


def lab_of(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> normalized Lab [N, 3, H, W], as the loader makes it."""
    return rgb_to_lab_triplets(rgb[:, None])[:, 0]


def lines(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, kornia's full hysteresis) as boolean line maps [N, 1, H, W]."""
    _, full = kornia.filters.canny((lab[:, :1] + 1) / 2, LOW, HIGH)
    return line_art(lab, LOW, HIGH) < 0, full > 0


@pytest.mark.parametrize(("side", "clips"), [
    (128, ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"]),
    (480, ["bigbuckbunny.mp4", "bikes.mp4"]),
])
def test_equals_kornias_hysteresis_on_real_frames(side, clips):
    frames = 3 if side == 128 else 2  # 480^2: kornia's loop takes seconds on a CPU
    for clip in clips:
        ours, full = lines(lab_of(centre_crops(clip, side, frames, every=40)))
        assert full.any(), clip
        assert not (ours & ~full).any(), clip  # a cut-short chain only loses pixels
        differing = (ours != full).float().mean().item()
        assert differing <= MAX_DIFFERING[side], (clip, differing)


def ramped_edge(width: int) -> torch.Tensor:
    """Normalized Lab [1, 3, 32, width]: a horizontal step edge whose contrast fades from
    strong (its first 12 pixels are above `HIGH`) to weak (above `LOW` only): one weak chain
    of width - 12 pixels grows from 12 strong ones."""
    contrast = (0.3 - 0.02 * torch.arange(width)).clamp(min=0.06)
    grey = torch.full((32, width), 0.5)
    grey[:16] += contrast
    return torch.cat([grey[None, None] * 2 - 1, torch.zeros(1, 2, 32, width)], dim=1)


def test_a_weak_chain_is_followed_for_the_fixed_number_of_rounds():
    strong = 12
    ours, full = lines(ramped_edge(strong + HYSTERESIS_ROUNDS))
    assert torch.equal(ours, full) and full.sum() == strong + HYSTERESIS_ROUNDS
    ours, full = lines(ramped_edge(strong + HYSTERESIS_ROUNDS + 30))
    assert full.sum() == strong + HYSTERESIS_ROUNDS + 30  # kornia follows it to the end
    assert ours.sum() == strong + HYSTERESIS_ROUNDS and not (ours & ~full).any()


class HostReads:
    """Records where Python reads a tensor's value on the host: (file, function) of the caller."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")

    def __init__(self, monkeypatch):
        self.sites = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self.recording(getattr(torch.Tensor, name)))

    def recording(self, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code
            self.sites.append((Path(caller.co_filename).name, caller.co_name))
            return original(*args, **kwargs)
        return wrapper


# kornia's blur checks sigma > 0 on a CPU tensor it builds from the Python numbers (its comment:
# "checked without reading the GPU"): a host read, but no device sync. From kornia 0.9.2 the
# same check goes through its `_check_async` (torch._assert_async on CUDA, a read on the CPU).
SIGMA_CHECKS = {("gaussian.py", "_gaussian_blur2d"), ("check.py", "_check_async")}


def test_no_host_reads(monkeypatch):
    lab = lab_of(centre_crops("bigbuckbunny.mp4", 64, frames=2, every=1))
    reads = HostReads(monkeypatch)
    kornia.filters.canny((lab[:, :1] + 1) / 2, LOW, HIGH)
    assert ("canny.py", "canny") in reads.sites  # kornia's own hysteresis loop is seen
    reads.sites.clear()
    line_art(lab, LOW, HIGH)
    assert set(reads.sites) <= SIGMA_CHECKS
