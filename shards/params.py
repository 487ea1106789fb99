"""What a shard build is asked to do: `tricolor-shards build`'s options as BuildParams,
checked (`BuildParams.check`, ValueError naming the option) before any file is touched, and
the splits every build writes."""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "val")
# The short side of 8K UHD video. Beyond it a frame is over 100 MB of RGB (20000 would be
# 2.4 GB a frame) and, for any real source, only an upsampled copy: surely a typo.
MAX_SHORT_SIDE = 4320


@dataclass
class BuildParams:
    short_side: int = 256
    val_fraction: float = 0.1
    samples_per_shard: int = 1000
    quality: int = 95
    scene_threshold: float = 27.0
    split_by: str = "scene"  # "scene" or "video": the unit that goes wholly to train or val
    seed: int = 0
    slice: tuple[int, int] | None = None  # (K, N): this build handles inputs K, K+N, K+2N, ...
    flow: bool = False  # also store optical flow and occlusion masks (shards/flow.py)

    def check(self) -> None:
        if not 16 <= self.short_side <= MAX_SHORT_SIDE or self.short_side % 2:
            raise ValueError(
                f"--short-side must be an even number in 16..{MAX_SHORT_SIDE} (8K's short "
                f"side; larger frames only upsample the source), got {self.short_side}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.split_by not in ("scene", "video"):
            raise ValueError(f"--split-by must be 'scene' or 'video', got {self.split_by!r}")
        if self.slice is not None:
            k, n = self.slice
            if not 0 <= k < n:
                raise ValueError(f"--slice K/N needs 0 <= K < N, got {k}/{n}")
