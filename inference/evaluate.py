"""`tricolor-eval` (also `python -m inference.evaluate`): score a model against two baselines.

    tricolor-eval --model RUN_OR_EXPORT_DIR --videos V... [--json OUT] [--max-frames N]
        [--device auto|cpu|cuda] [--batch-size N] [--size S] [--scene-threshold T]
        [--keyframes none|first|every:N]

Each colour video is colorized from its own greyscale (grey mode: its L; line-art mode: line
art extracted as in training) exactly as `tricolor-colorize` colours it (the same working
resolution, windows, scene-cut resets and full-resolution recombination), and scored
against the original at the original's resolution, next to two baselines made the same way:

- zero_chroma: the greyscale itself (the original's L with a = b = 0);
- per_frame: the same weights with the temporal input replaced by the centre frame
  (`temporal=False`: GreyUNet sees frame t in place of t-1 and t+1; LineartUNet never gets a
  colour hint), the ablation that shows what the temporal input buys.

Metrics (`metrics.VideoScores`; each defined in `metrics/`), per video:
PSNR and SSIM on RGB in [0, 1]; CDC (dilations {1, 2, 4}) with the ground truth's own CDC as
the floor; the Farnebäck warp error (flow on the original's L, the same flows for every
method) with the ground truth's as the floor, and the excess over it; colourfulness
(Hasler & Süsstrunk, mean over frames) and |ΔM| to the ground truth; mean CIEDE2000. Overall:
the mean over videos of the per-video values. Frames are streamed: a video of any length is
scored in constant memory (`--max-frames` scores only the first N frames).

Protocols (`--keyframes`): `none`, automatic; `first`, the
ground truth's first frame of every scene is given (the exemplar protocol of DeepExemplar and
ColorMNet); `every:N`, its frame at every N-th frame. Every table and the JSON name the
protocol; for a model without colour memory the given frames are only pasted in (a control:
nothing carries them on). A given frame is left out of the per-frame scores (PSNR, SSIM, CIEDE2000,
colourfulness), so it does not flatter them, and kept in the temporal ones (CDC, warp), where
a jump out of it shows. Each video's JSON has `psnr_by_frame`, per method each frame's
PSNR (null at given frames): the drift curve. Under a keyframe protocol two more baselines,
neither using the model: `keyframe_copy`, the scene's last keyframe pasted on every later
frame (its a,b on the frame's own L in grey mode, the keyframe itself in line art), which
ignores motion; and `keyframe_flow`, the same keyframe sampled once through the anchor track
(models/anchor.py: DIS flow on the input chained back to the keyframe, pasted in place where
the chain is lost). Its flow is DIS on the input, the warp metric's is Farnebäck on the
truth: the metric does not score a method with its own flow.

A greyscale video (every scored frame grey) has no colour to score against: it is reported
with a warning and `"greyscale": true`, its zero-chroma baseline (the truth itself) left
blank, and it is left out of the overall means. A video that fails midway (damaged, a frame
size that changes) is named under `failures`; the others are still scored, the table and
the JSON written, and the exit status is 1. A `--json` that names a folder, one of the
videos or an unwritable place fails before any scoring.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from inference.colorizer import SCENE_THRESHOLD, Colorizer, keyframe_colour, prepare
from inference.keyframes import KeyframeError, TruthKeyframes, is_greyscale
from inference.model import Model, ModelError, load_model, pick_device, resolve_size
from inference.video_in import Frame, Source
from inference.video_out import OutputError
from metrics import VideoScores
from models.anchor import AnchorTrack, flow_input
from models.colour import compose_grey, rgb_to_cielab
from shards.atomic import write_json_atomic
from shards.video import VideoError, find_videos

METHODS = ("model", "per_frame", "zero_chroma")
KEYFRAME_COPY = "keyframe_copy"  # under a keyframe protocol: the last keyframe, pasted on
KEYFRAME_FLOW = "keyframe_flow"  # ... and sampled through the anchor track (models/anchor.py)
AUTOMATIC = "automatic: no colour given"
CONVENTIONS = (
    "RGB in [0, 1] at each video's own resolution, 8-bit frames as decoded / written; "
    "PSNR over all frames of a video (capped at 100 dB), SSIM (Gaussian 11, sigma 1.5) the "
    "mean over frames; CDC on 8-bit RGB histograms, JS in nats, dilations {1, 2, 4}; warp "
    "error: Farnebäck flow on the ground truth's L / 100 as uint8, forward-backward "
    "occlusion mask, mean over frame pairs of the masked per-channel squared error; "
    "colourfulness (Hasler & Süsstrunk) on [0, 255], mean over frames, |dM| of the means; "
    "CIEDE2000 (k_L = k_C = k_H = 1, D65) mean over pixels and frames; overall: the mean "
    "over videos of the per-video values (warp: over videos with a valid frame pair)")
# (key, header, scale, format): CDC and warp errors are printed x 1e3.
COLUMNS = (("psnr", "PSNR", 1, "{:7.2f}"), ("ssim", "SSIM", 1, "{:7.4f}"),
           ("cdc", "CDC", 1e3, "{:7.3f}"), ("cdc_truth", "floor", 1e3, "{:7.3f}"),
           ("warp", "warp", 1e3, "{:7.3f}"), ("warp_truth", "floor", 1e3, "{:7.3f}"),
           ("warp_excess", "excess", 1e3, "{:7.3f}"), ("colourfulness_diff", "|dM|", 1,
                                                        "{:7.2f}"),
           ("ciede2000", "dE00", 1, "{:7.2f}"))


def first(frames: Iterator[Frame], n: int | None) -> Iterator[Frame]:
    """The first `n` frames (all for None), closing the decoder when stopping early."""
    try:
        for i, frame in enumerate(frames):
            if n is not None and i >= n:
                return
            yield frame
    finally:
        frames.close()


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> RGB [3, H, W] in [0, 1], fp32 on the host."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


def score_video(path: Path, model: Model, per_frame: Model, device: torch.device,
                args: argparse.Namespace, keyframes: TruthKeyframes | None = None) -> dict:
    source = Source(path)
    size, why = resolve_size(model, source.width, source.height, args.size)
    total = min(source.frames, args.max_frames) if args.max_frames else source.frames
    frames = first(source.read(), args.max_frames)
    items = prepare(frames, size, model, device, float(source.fps), args.scene_threshold)
    if keyframes is not None:
        items = keyframes(items)
    items = Colorizer(model, args.batch_size)(items, "model")
    items = Colorizer(per_frame, args.batch_size)(items, "per_frame")
    methods = [*METHODS, *([KEYFRAME_COPY, KEYFRAME_FLOW] if keyframes is not None else [])]
    scores = VideoScores(methods)
    scenes, greyscale, given = 0, True, []
    zero_ab = torch.zeros(2, 1, 1, device=device)
    copied, scene = None, None  # the scene's last keyframe, as the copy baseline pastes it
    track = AnchorTrack()  # where each pixel lies in that keyframe
    for item in tqdm(items, total=total or None, unit="frame", desc=path.name,
                     file=sys.stderr, dynamic_ncols=True):
        truth = to_tensor(item.rgb)
        grey = rgb_to_cielab(truth)[:1] / 100  # L in [0, 1]: the flow's input
        preds = {"model": to_tensor(item.outputs["model"]),
                 "per_frame": to_tensor(item.outputs["per_frame"]),
                 "zero_chroma": to_tensor(compose_grey(item.rgb, zero_ab))}
        scored = item.keyframe is None  # a keyframe's colour is the truth's: not scored
        if not scored:
            given.append(item.index)
        if keyframes is not None:
            if item.scene != scene:
                copied, scene, track = None, item.scene, AnchorTrack()
            grey_input = flow_input(item.cond[0].cpu().numpy(), model.mode)
            if item.keyframe is not None:  # its a,b (grey mode), or itself (line art: no L)
                copied = (keyframe_colour(item, "grey") if model.mode == "grey"
                          else to_tensor(item.keyframe))
                track.start(grey_input)
            elif track.started:
                track.step(grey_input)
            preds[KEYFRAME_COPY] = to_tensor(paste(item, copied, model.mode))
            preds[KEYFRAME_FLOW] = to_tensor(paste(item, copied, model.mode, track))
        scores.update(truth, grey, preds, scored)
        scenes = item.scene + 1
        greyscale = greyscale and is_greyscale(item.rgb)
    if not scores.scored:
        raise VideoError(f"{path}: no frame left to score: all {scores.frames} are given "
                         f"keyframes (--keyframes {args.keyframes})")
    methods = scores.compute()
    if greyscale:
        # The truth has no colour: the zero-chroma baseline is the truth itself (100 dB),
        # and no score says how well colour is predicted. Marked, not averaged.
        print(f"tricolor-eval: warning: {path}: greyscale video (every scored frame): it has "
              "no colour to score against; reported but left out of the overall means",
              file=sys.stderr)
        methods["zero_chroma"] = {k: float("nan") for k in methods["zero_chroma"]}
    return {"path": str(path), "frames": scores.frames, "scored_frames": scores.scored,
            "keyframes": given, "size": [source.width, source.height],
            "fps": float(source.fps), "working_size": list(size), "working_size_from": why,
            "scenes": scenes, "greyscale": greyscale, "methods": methods,
            "psnr_by_frame": scores.psnr_by_frame()}


def paste(item, copied: torch.Tensor | None, mode: str,
          track: AnchorTrack | None = None) -> np.ndarray:
    """The copy baseline's frame: the keyframe's colour on this frame's L (grey mode) or the
    keyframe itself (line art); before any keyframe of the scene, zero chroma / grey. With
    `track`, the flow baseline's: the keyframe sampled where each pixel came from (pasted in
    place where the track lost it)."""
    if copied is None:
        return compose_grey(item.rgb, torch.zeros(2, 1, 1))
    if track is not None:
        height, width = item.rgb.shape[:2]
        colour, _ = track.sample(copied.permute(1, 2, 0).cpu().numpy(), height, width)
        copied = torch.from_numpy(colour).permute(2, 0, 1)
    if mode == "grey":
        return compose_grey(item.rgb, copied)
    return (copied * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def overall(videos: list[dict]) -> dict[str, dict[str, float]] | None:
    """The mean over the colour videos of each per-video value (NaN values, e.g. the warp
    error of a video without a valid frame pair, are left out); None without any."""
    videos = [v for v in videos if not v["greyscale"]]
    if not videos:
        return None
    out = {}
    for method in videos[0]["methods"]:
        keys = videos[0]["methods"][method].keys()
        out[method] = {}
        for key in keys:
            vals = [v["methods"][method][key] for v in videos]
            vals = [x for x in vals if not math.isnan(x)]
            out[method][key] = float(np.mean(vals)) if vals else float("nan")
    return out


def table(report: dict) -> str:
    head = f"{'':28s}" + "".join(f"{h:>8s}" for _, h, _, _ in COLUMNS)
    lines = [head]

    def rows(title: str, methods: dict) -> None:
        lines.append(title)
        for method in methods:
            cells = []
            for key, _, scale, fmt in COLUMNS:
                x = methods[method][key]
                cells.append(" " + (f"{'-':>7s}" if math.isnan(x) else fmt.format(x * scale)))
            lines.append(f"  {method:26s}" + "".join(cells))

    lines.insert(0, f"protocol: {report['protocol']}")
    for v in report["videos"]:
        w, h = v["size"]
        grey = "; GREYSCALE: no colour to score, not in overall" if v["greyscale"] else ""
        given = (f"; {len(v['keyframes'])} keyframes given, not scored" if v["keyframes"]
                 else "")
        rows(f"{Path(v['path']).name} ({v['frames']} frames, {w}x{h}, {v['scenes']} scenes"
             f"{given}{grey})", v["methods"])
    n = sum(not v["greyscale"] for v in report["videos"])
    if report["overall"] is None:
        lines.append("overall: no colour video scored")
    else:
        rows(f"overall ({n} video{'s' if n != 1 else ''})", report["overall"])
    for failure in report["failures"]:
        lines.append(f"FAILED {failure['path']}: {failure['error']}")
    lines.append("PSNR (dB) and SSIM: higher is better. CDC, warp error and excess (all x 1e-3; "
                 "floor: the ground truth's own), |dM| (colourfulness difference) and dE00 "
                 "(mean CIEDE2000): lower is better.")
    return "\n".join(lines)


def json_safe(x):
    """NaN (undefined, e.g. no valid warp pair) -> null: valid JSON."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tricolor-eval", description="Score a tricolor model "
                                "against the zero-chroma and per-frame baselines.")
    p.add_argument("--model", required=True, type=Path,
                   help="run folder (runs/NAME) or its export/ folder")
    p.add_argument("--videos", required=True, nargs="+", metavar="V",
                   help="colour videos (files or folders of them)")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--max-frames", type=int, help="score only the first N frames of each")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=8,
                   help="frames per G forward (grey mode without memory; else recurrent: 1)")
    p.add_argument("--size", type=int, default=None,
                   help="short side of the working resolution (as tricolor-colorize)")
    p.add_argument("--scene-threshold", type=float, default=SCENE_THRESHOLD)
    p.add_argument("--keyframes", default="none", metavar="none|first|every:N",
                   help="the protocol: none (automatic); first: the truth's first frame of "
                        "every scene is given (the exemplar protocol); every:N: its frame at "
                        "every N-th frame (N >= 2). Given frames are not scored")
    args = p.parse_args(argv)
    for name in ("max_frames", "batch_size", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def check_json(path: Path, videos: list[Path]) -> None:
    """Fail before any scoring when the report could not be written to `path`, or would
    replace one of the videos."""
    parent = path.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the folder {parent} does not exist or is not writable")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; --json names the report file to write")
    if path.exists() and any(os.path.samefile(path, video) for video in videos):
        raise OutputError(f"{path}: is one of the videos; --json names the report file")


def run(args: argparse.Namespace) -> int:
    # A mistyped protocol fails at once, before the videos are opened or the model loaded.
    keyframes = TruthKeyframes(args.keyframes) if args.keyframes != "none" else None
    try:
        paths = find_videos(args.videos)
    except FileNotFoundError as e:
        raise VideoError(str(e)) from e
    if args.json is not None:
        check_json(args.json, paths)
    if not paths:
        raise VideoError(f"no videos in {' '.join(args.videos)}")
    for path in paths:  # every input readable before the long work starts
        Source(path)
    device = pick_device(args.device)
    model = load_model(args.model, device)
    per_frame = model.with_temporal(False)
    protocol = AUTOMATIC
    if keyframes is not None:
        protocol = keyframes.describe()
        if not model.takes_keyframes:  # a control: the keyframes are in, nothing carries them
            protocol += ("; this model has no colour memory: the given frames are pasted, "
                         "not carried on")
    print(f"model: {model.export_dir} ({model.mode} mode, step {model.step}) on {device}; "
          f"protocol: {protocol}", file=sys.stderr)
    videos, failures = [], []
    for path in paths:
        try:
            videos.append(score_video(path, model, per_frame, device, args, keyframes))
        except VideoError as e:  # e.g. damaged midway: the others are still scored
            print(f"tricolor-eval: error: {e}; scoring the other videos", file=sys.stderr)
            failures.append({"path": str(path), "error": str(e)})
    report = {"model": str(model.export_dir), "mode": model.mode, "step": model.step,
              "protocol": protocol, "keyframes": args.keyframes, "conventions": CONVENTIONS,
              "videos": videos, "overall": overall(videos),
              "failures": failures}
    print(table(report))
    if args.json is not None:
        write_json_atomic(args.json, json_safe(report))
        print(f"wrote {args.json}", file=sys.stderr)
    if failures:
        print(f"tricolor-eval: error: {len(failures)} of {len(paths)} videos failed: "
              f"{', '.join(f['path'] for f in failures)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ModelError, VideoError, OutputError, KeyframeError) as e:
        print(f"tricolor-eval: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tricolor-eval: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
