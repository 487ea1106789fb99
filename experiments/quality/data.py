"""The data of `make quality`, made once under --out and reused: training shards from the early
frames of the sample clips, their later frames and another clip as held-out test videos."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.quality.common import log, run_cmd

SHORT_SIDE = 128  # of the shards and the test clips, as `make demo` builds them
TRAIN_SHARE = 0.7  # the first 70 % of each clip's frames train
SPLIT_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
OTHER_DOMAIN = "carphone_pristine.mp4"
STRIP_CLIP = "bigbuckbunny_late"  # the strip's frames: the first STRIP_FRAMES of this test clip
STRIP_FRAMES = 31  # line-art strip: frames 0, 10, 30


def write_clip(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """Lossless H.264 in RGB (libx264rgb, crf 0): decoding gives back exactly these frames.
    Written under a temporary name and renamed: never a partial clip under the final name."""
    import av

    tmp = path.with_name(f".{path.name}.tmp.mp4")
    h, w = frames[0].shape[:2]
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264rgb", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "rgb24"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    tmp.replace(path)


def prepare_data(data: Path) -> dict:
    """Train shards and test clips under `data`, made once: reused while `data.json` says
    they were made with the same parameters."""
    from shards.video import decode_frames, sample_video

    params = {"short_side": SHORT_SIDE, "train_share": TRAIN_SHARE, "clips": SPLIT_CLIPS,
              "other_domain": OTHER_DOMAIN, "strip": [STRIP_CLIP, STRIP_FRAMES], "flow": True,
              "version": 2}
    stamp = data / "data.json"
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info["params"] == json.loads(json.dumps(params)):
            log(f"data: reusing {data}")
            return info
    t0 = time.perf_counter()
    for sub in ("train", "test"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    clips = {}
    for name in SPLIT_CLIPS:
        meta, frames = decode_frames(sample_video(name), SHORT_SIDE)
        frames = list(frames)
        cut = round(TRAIN_SHARE * len(frames))
        stem = Path(name).stem
        write_clip(data / "train" / f"{stem}_early.mp4", frames[:cut], meta.fps)
        late = data / "test" / f"{stem}_late.mp4"
        write_clip(late, frames[cut:], meta.fps)
        clips[f"{stem}_late"] = {"path": str(late), "frames": len(frames) - cut,
                                 "from_frame": cut, "of": len(frames),
                                 "size": [meta.width, meta.height]}
        if f"{stem}_late" == STRIP_CLIP:
            write_clip(data / "strip.mp4", frames[cut:cut + STRIP_FRAMES], meta.fps)
    other = sample_video(OTHER_DOMAIN)
    log(f"data: clips written ({time.perf_counter() - t0:.0f} s); building shards")
    (data / "logs").mkdir(exist_ok=True)
    run_cmd([sys.executable, "-m", "shards", "build", str(data / "train"), "--out",
             str(data / "shards"), "--overwrite", "--short-side", str(SHORT_SIDE),
             "--val-fraction", "0.1", "--split-by", "scene", "--samples-per-shard", "64",
             "--flow"],  # for the temporal loss; the loader reads it only for that
            data / "logs" / "shards.log")
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    info = {
        "params": params,
        "shards": str(data / "shards"),
        "splits": {k: {"samples": v["samples"], "scenes": v["scenes"]}
                   for k, v in manifest["splits"].items()},
        "protocols": {
            "same_film": [c["path"] for c in clips.values()],
            "other_domain": [str(other)],
        },
        "clips": clips,
        "strip": str(data / "strip.mp4"),
        "seconds": time.perf_counter() - t0,
    }
    stamp.write_text(json.dumps(info, indent=1))
    log(f"data: ready in {info['seconds']:.0f} s: " + ", ".join(
        f"{k} {v['samples']} triplets / {v['scenes']} scenes" for k, v in info["splits"].items()))
    return info
