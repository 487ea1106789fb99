"""`python -m bench.data --ablation`: DALI decode-only pipelines built here with the same
reader and ops as trainer/data/dali_loader.py, each with one setting changed (ROI vs full
decode, fast IDCT, deeper prefetch, the Lab conversion inside DALI), to see what the trainer's
pipeline settings are worth. Decode only, on the CPU."""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import cpu_seconds
from bench.data_variants import LINEAR_TO_XYZ_WHITE, SRGB_TO_LINEAR
from models.colour import AB_SCALE, L_SCALE, rgb_to_lab_triplets
from trainer.data.samples import FRAME_MEMBERS, scan_split

# ---------------------------------------------------------------------------------------------
# Ablation: what the DALI pipeline's choices are worth (decode-only, CPU).

ABLATIONS = {  # name -> build options; "roi" is what trainer/data/dali_loader.py does
    "roi": {},
    "roi+fast_idct": {"fast_idct": True},
    "full+crop": {"decode": "full"},
    "roi+prefetch4": {"prefetch": 4},
    "roi+lab_in_dali": {"lab": True},
}


def _dali_lab(image):
    """uint8 RGB HWC -> normalized Lab HWC fp32 with DALI ops (DALI has no Lab conversion)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    linear = fn.lookup_table(image, keys=list(range(256)), values=SRGB_TO_LINEAR.tolist(),
                             dtype=types.FLOAT)
    xyz = fn.coord_transform(linear, M=LINEAR_TO_XYZ_WHITE.T.flatten().tolist())
    eps = 0.008856
    straight = xyz * 7.787 + 4.0 / 29.0
    f = straight + (xyz > eps) * (dmath.cbrt(dmath.max(xyz, eps)) - straight)
    to_lab = [[0.0, 116.0 / L_SCALE, 0.0, -16.0 / L_SCALE - 1.0],
              [500.0 / AB_SCALE, -500.0 / AB_SCALE, 0.0, 0.0],
              [0.0, 200.0 / AB_SCALE, -200.0 / AB_SCALE, 0.0]]
    return fn.coord_transform(f, MT=[x for row in to_lab for x in row])


def ablation_pipeline(tars: list[str], indexes: list[str], crop: int, batch_size: int,
                      threads: int, decode: str = "roi", fast_idct: bool = False,
                      prefetch: int = 2, lab: bool = False):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, seed=0,
                  prefetch_queue_depth=prefetch)
    def triplets():
        encoded = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=list(FRAME_MEMBERS),
                                        random_shuffle=True, initial_fill=1024,
                                        pad_last_batch=True, name="Reader")
        crop_x = fn.random.uniform(range=(0.0, 1.0))
        crop_y = fn.random.uniform(range=(0.0, 1.0))
        mirror = fn.random.coin_flip(probability=0.5)
        frames = []
        for jpeg in encoded:
            if decode == "roi":
                image = fn.decoders.image_crop(jpeg, device="cpu", output_type=types.RGB,
                                               crop=(crop, crop), crop_pos_x=crop_x,
                                               crop_pos_y=crop_y, use_fast_idct=fast_idct)
            else:
                image = fn.decoders.image(jpeg, device="cpu", output_type=types.RGB,
                                          use_fast_idct=fast_idct)
                image = fn.crop(image, crop=(crop, crop), crop_pos_x=crop_x, crop_pos_y=crop_y)
            image = fn.flip(image, horizontal=mirror)
            frames.append(_dali_lab(image) if lab else image)
        return fn.stack(*frames)

    pipe = triplets()
    pipe.build()
    return pipe


def check_dali_lab(tars: list[str], indexes: list[str]) -> float:
    """Max |DALI Lab - trainer's Lab| on one batch of the same decoded crops."""
    pipe = ablation_pipeline(tars, indexes, 64, 4, 1)
    (frames,) = pipe.run()
    u8 = torch.from_numpy(np.stack([np.asarray(frames[i]) for i in range(len(frames))]))
    lab_pipe = ablation_pipeline(tars, indexes, 64, 4, 1, lab=True)
    (lab,) = lab_pipe.run()
    ours = torch.from_numpy(np.stack([np.asarray(lab[i]) for i in range(len(lab))]))
    reference = rgb_to_lab_triplets(u8)  # [B, 3, 3, H, W]
    return (ours.permute(0, 1, 4, 2, 3) - reference).abs().max().item()


def run_ablation(args, shards: Path) -> list[dict]:
    samples = scan_split(shards, "train", 1)
    with tempfile.TemporaryDirectory(prefix="tricolor-bench-idx-") as idx_dir:
        tars, indexes = samples.write_indexes(Path(idx_dir))
        print(f"ablation: DALI Lab vs trainer Lab, max abs difference "
              f"{check_dali_lab(tars, indexes):.2e}", file=sys.stderr)
        runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for crop in args.crops:
                for name, options in ABLATIONS.items():
                    pipe = ablation_pipeline(tars, indexes, crop, args.batch_size, args.threads,
                                             **options)
                    for _ in range(args.warmup):
                        pipe.run()
                    t0, cpu0 = time.perf_counter(), cpu_seconds()
                    for _ in range(args.batches):
                        pipe.run()
                    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
                    del pipe
                    gc.collect()
                    n = args.batches * args.batch_size
                    runs.setdefault((crop, name), []).append((n / seconds, 1000.0 * cpu / n))
    rows = []
    for (crop, name), v in runs.items():
        rows.append({"crop": crop, "pipeline": name,
                     "triplets_per_s": statistics.median(x[0] for x in v),
                     "cpu_ms_per_triplet": statistics.median(x[1] for x in v)})
    return rows


def ablation_table(rows: list[dict]) -> str:
    base = {r["crop"]: r["cpu_ms_per_triplet"] for r in rows if r["pipeline"] == "roi"}
    lines = ["| crop | DALI pipeline (decode only) | triplets/s | CPU ms/triplet | CPU vs roi |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['crop']} | {r['pipeline']} | {r['triplets_per_s']:.1f} | "
                     f"{r['cpu_ms_per_triplet']:.2f} | "
                     f"{r['cpu_ms_per_triplet'] / base[r['crop']]:.2f}x |")
    return "\n".join(lines)

