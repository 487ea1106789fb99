"""The stage shards of `make gpu-check`, built on the CPU side by `make gpu-wheels` (the GPU host
lacks PyAV, which decoding videos needs) into .gpu-wheels/base/shards: `small` (crop 64
trainer runs, with a val split) and `large` (512x512 frames, for DALI at crop 480)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

SHARD_SETS = {
    # name: (clips as (scene lengths, width, height), short side, val fraction)
    "small": ([([20, 20, 20], 192, 128), ([20, 20], 192, 128)], 128, 0.25),
    "large": ([([26], 512, 512)], 512, 0.0),
}


def build_stage_shards(out: Path, scale: float = 1.0) -> dict:
    """Synthetic clips (tests/videos.py, PyAV) -> `out/<set>` shards, verified; returns
    {set: bytes}. `scale` < 1 shrinks the clips (tests)."""
    import tempfile

    from shards.cli import main as shards_main
    from tests.videos import scene_video

    sizes = {}
    for name, (clips, short, val) in SHARD_SETS.items():
        short = max(16, int(short * scale) // 16 * 16)
        with tempfile.TemporaryDirectory(prefix="tricolor-gpu-clips-") as tmp:
            videos = []
            for i, (scenes, w, h) in enumerate(clips):
                w, h = max(16, int(w * scale) // 16 * 16), max(16, int(h * scale) // 16 * 16)
                videos.append(str(scene_video(Path(tmp) / f"{name}{i}.mp4", scenes, w, h)))
            argv = ["build", *videos, "--out", str(out / name), "--overwrite",
                    "--short-side", str(short), "--val-fraction", str(val),
                    "--samples-per-shard", "64"]
            with contextlib.redirect_stdout(sys.stderr):
                if shards_main(argv) != 0 or shards_main(["verify", str(out / name)]) != 0:
                    raise RuntimeError(f"building the {name} stage shards failed")
        sizes[name] = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
    return sizes

