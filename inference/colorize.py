"""`tricolor-colorize` (also `python -m inference.colorize`): a video in, the colored video out.

    tricolor-colorize --model RUN_OR_EXPORT_DIR --input IN --output OUT
        [--device auto|cpu|cuda] [--batch-size N] [--side-by-side] [--lineart]
        [--size S] [--scene-threshold T] [--fps F] [--crf Q] [--preset P] [--overwrite]
        [--keyframes FOLDER | --keyframes VIDEO (--keyframe-frames I,J,... | --keyframe-at-cuts)]

IN is a video file or a folder of frames (sorted by name, `--fps` for their rate). A video's
frames are taken upright: its display rotation (phones record sideways and set one) is
applied, and the output is upright, without a rotation. OUT is a video (.mp4 .mkv .mov .m4v
.avi: H.264 at `--crf`, default 16, with the input's frame rate, upright size, frame count,
timestamps and chroma subsampling (4:2:0 unless the input is 4:2:2 or 4:4:4), its audio
stream copied packet for packet) or a folder of PNG frames (any other path without a
suffix), marked as this tool's by a `.tricolor-frames` file. An existing OUT is replaced
only with `--overwrite`, and only if it is a video file or a frames folder this tool wrote
(its marker and nothing but its frames); OUT is never the input. OUT is written under a
temporary name beside it and renamed when complete. Each frame is colored as the model was
trained:

- Working resolution: the frame is resized (area averaging, as the shards were made) so
  that its short side is S -- by default the short side of the frames the model was
  trained on (the run's `config.yaml` -> shards `manifest.json`), else 256 -- and both
  sides are rounded to multiples of 2**depth. G is fully convolutional; S sets the scale
  of what it sees, which is what it learned (the training crop only sets the field of view).
- Grey mode: G sees the L of frames (t-1, t, t+1) and predicts a,b of frame t. These are
  upsampled (bilinear) to the input's full resolution and combined with the input's own
  full-resolution L, so luminance is kept exactly and the picture is never blurred. Where
  that colour falls outside sRGB, its chroma is reduced towards the grey of the same
  luminance (closed form in linear RGB) instead of clipping channels, which would change
  the luminance.
- Line-art mode: line art is extracted from each frame at the working resolution as in
  training (`trainer.data.transforms.line_art`, with the run's Canny thresholds), or the
  input is line art already (`--lineart`: its L is the condition). G gets its own previous
  output, none at a scene's first frame; its Lab output is upsampled to full resolution.
- Colour memory (line-art mode; grey mode trained with `model.memory`): G also gets the
  colour of the previous frame, its own previous output, so it runs recurrently, one frame
  at a time; none at a scene's first frame unless a keyframe is given.
- Keyframes (`--keyframes`, a model with colour memory): a folder of colour images named by
  frame index (`000120.png`), or a colour video as long as the input with
  `--keyframe-frames 0,120,...` or `--keyframe-at-cuts` (its frame at every scene start of
  the input). At a keyframe the output is the keyframe's colour on the input's luminance
  (grey mode) or the keyframe itself (line art), and the memory goes on from its colour at
  the working resolution. A keyframe of the input's aspect but another size is resized (and
  the tool says so); keyframe images (and input frames) are read as an image viewer shows
  them, their EXIF orientation applied, and the tool says so. Another aspect, a greyscale,
  transparent or unreadable image, anything but a regular file (a FIFO), an EXIF orientation
  outside 1..8, an index past the input's end or not plain decimal digits, or keyframes for
  a model without memory are errors (inference/keyframes.py).
- Scene cuts: the content detector of `tricolor-shards` (`shards.scenes.SceneCuts`) on the
  working-resolution frames. At a cut the temporal context restarts: the grey-mode window
  is padded with frame t, as at a video's first and last frames ((t, t, t+1) and
  (t-1, t, t)); the colour memory starts from none. For a greyscale input the
  detector's hue and saturation terms are constant, so its score (the mean of the three)
  is a third of the luma change: the threshold is divided by 3 for such videos.
- Memory: frames stream through decoding, G and encoding; grey mode holds at most
  batch size + 2 frames; a model with colour memory is recurrent, one frame at a time (its
  batch is 1); folder keyframes are held at the input's size.

Errors (exit status 1, a message naming the file): an unreadable, empty or truncated input,
or one whose frame size changes mid-stream; a model folder without an export, or whose
settings (`generator.json`) do not describe its weights (checked against the weights file's
header before the network is built, so absurd settings allocate nothing); an output that
cannot be written, that is the input in any spelling (relative, `..`, a symbolic or hard
link), contains it or lies inside an input folder, or that exists and may not be replaced
(above). Ctrl-C exits 130, SIGTERM 143. None of these leaves anything under OUT's name or a
temporary one, and an existing OUT is untouched. A run killed outright (SIGKILL, the
out-of-memory killer) cannot clean up: its hidden `.OUT.partial-HOST-PID` is removed, and
said, by the next run for the same OUT on the same host once that process is gone (never one
of a running process, nor of another host: that one is left, to delete by hand).

This module is the command; the model and its settings are inference/model.py, the frames'
way through G inference/colorizer.py (what G is given per frame: models/rollout.py), a Slurm
array's plan over many videos inference/batch.py.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from inference.batch import (
    BatchError,
    batch_plan,
    batch_task,
    batch_task_main,
    output_complete,
)
from inference.colorizer import SCENE_THRESHOLD, Colorizer, condition_image, prepare
from inference.keyframes import (
    KeyframeError,
    KeyframeFolder,
    KeyframeVideo,
    parse_frame_list,
)
from inference.model import (
    DEFAULT_SHORT_SIDE,
    Model,
    ModelError,
    load_model,
    pick_device,
    resolve_size,
)
from inference.video_in import Source
from inference.video_out import (
    DEFAULT_CRF,
    DEFAULT_PRESET,
    X264_PRESETS,
    FrameFolderSink,
    OutputError,
    VideoSink,
    check_not_input,
    check_output,
    output_kind,
    remove_stale_temporaries,
)
from models.colour import compose_grey
from shards.video import VideoError

# Importable from here too, though defined elsewhere: slurm/colorize.sbatch calls
# batch_task_main, and experiments/quality/run.py imports compose_grey.
__all__ = ["BatchError", "batch_plan", "batch_task", "batch_task_main", "compose_grey", "main",
           "output_complete"]


# --- the command ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tricolor-colorize",
                                description="Colorize a video (or a folder of frames) with a "
                                            "trained tricolor generator.")
    p.add_argument("--model", required=True, type=Path,
                   help="run folder (runs/NAME) or its export/ folder")
    p.add_argument("--input", required=True, type=Path, help="video file or folder of frames")
    p.add_argument("--output", required=True, type=Path,
                   help="video (.mp4 .mkv .mov .m4v .avi) or a folder for PNG frames")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--batch-size", type=int, default=8,
                   help="frames per G forward (grey mode without memory; a model with colour "
                        "memory is recurrent: 1)")
    p.add_argument("--side-by-side", action="store_true",
                   help="output G's input (greyscale or line art) | colored, twice as wide")
    p.add_argument("--lineart", action="store_true",
                   help="line-art model: the input is line art already (no extraction)")
    p.add_argument("--size", type=int, default=None,
                   help="short side of the working resolution, px (default: that of the "
                        f"training frames, else {DEFAULT_SHORT_SIDE})")
    p.add_argument("--scene-threshold", type=float, default=SCENE_THRESHOLD,
                   help="content-detector threshold for scene cuts (as tricolor-shards)")
    p.add_argument("--fps", type=float, default=25.0,
                   help="frame rate of a folder of frames (videos keep their own)")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF,
                   help="x264 quality of a video output: 0 lossless .. 51 worst")
    p.add_argument("--preset", choices=X264_PRESETS, default=DEFAULT_PRESET, metavar="PRESET",
                   help=f"x264 preset of a video output, {X264_PRESETS[0]} .. "
                        f"{X264_PRESETS[-1]} (default {DEFAULT_PRESET}; faster: larger files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--keyframes", type=Path, default=None,
                   help="colour keyframes (a model with colour memory): a folder of images "
                        "named by frame index (000120.png), or a colour video as long as the "
                        "input with --keyframe-frames or --keyframe-at-cuts")
    p.add_argument("--keyframe-frames", default=None, metavar="I,J,...",
                   help="with a keyframe video: the frames to take from it, e.g. 0,120")
    p.add_argument("--keyframe-at-cuts", action="store_true",
                   help="with a keyframe video: its frame at every scene start of the input")
    args = p.parse_args(argv)
    if (args.keyframe_frames is not None or args.keyframe_at_cuts) and args.keyframes is None:
        p.error("--keyframe-frames and --keyframe-at-cuts need --keyframes VIDEO")
    if args.keyframe_frames is not None and args.keyframe_at_cuts:
        p.error("--keyframe-frames and --keyframe-at-cuts: one or the other")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.size is not None and args.size < 1:
        p.error(f"--size must be >= 1, got {args.size}")
    if not 0 <= args.crf <= 51:
        p.error(f"--crf must lie in [0, 51], got {args.crf}")
    return args


def run(args: argparse.Namespace) -> int:
    check_output(args.output, args.overwrite, args.input)
    for tmp, pid in remove_stale_temporaries(args.output):
        print(f"removed {tmp}: the partial output of process {pid}, which was killed before "
              "it finished (it is no longer running)", file=sys.stderr)
    device = pick_device(args.device)
    model = load_model(args.model, device)
    if args.lineart and model.mode != "lineart":
        raise ModelError(f"--lineart needs a line-art model; {model.export_dir} is a "
                         f"{model.mode}-mode model")
    source = Source(args.input, fps=args.fps)
    size, why = resolve_size(model, source.width, source.height, args.size)
    print(f"model: {model.export_dir} ({model.mode} mode, step {model.step}) on {device}; "
          f"working size {size[0]}x{size[1]}, {why}", file=sys.stderr)
    print(f"input: {source.path}: {source.width}x{source.height}, {float(source.fps):.3f} fps, "
          f"{source.frames or 'unknown'} frames{', audio' if source.audio else ''}",
          file=sys.stderr)
    if args.keyframes is not None:
        check_not_input(args.output, args.keyframes)
    keyframes = open_keyframes(args, model, source)  # read and checked before any output
    out_w = source.width * (2 if args.side_by_side else 1)
    if output_kind(args.output) == "video":
        sink = VideoSink(args.output, out_w, source.height, source.fps, source.time_base,
                         source.path if source.audio else None, args.crf, source.pix_fmt,
                         args.preset)
    else:
        sink = FrameFolderSink(args.output, args.overwrite)
    items = prepare(source.read(), size, model, device, float(source.fps),
                    args.scene_threshold, args.lineart)
    if keyframes is not None:
        items = keyframes(items)
    written = 0
    try:
        with tqdm(total=source.frames or None, unit="frame", desc="colorize",
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for item in Colorizer(model, args.batch_size)(items, "out"):
                out = item.outputs.pop("out")
                if args.side_by_side:
                    out = np.concatenate([condition_image(item, model.mode), out], axis=1)
                sink.write(out, item.pts)
                written += 1
                bar.update(1)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    print(f"wrote {args.output} ({written} frames)", file=sys.stderr)
    return 0


def open_keyframes(args: argparse.Namespace, model: Model, source: Source):
    """The keyframe stage the arguments ask for (inference/keyframes.py), or None."""
    if args.keyframes is None:
        return None
    if not model.takes_keyframes:
        why = ("model.memory=false; train one with model.memory=true" if not model.memory
               else "model.temporal=false, the per-frame control")
        raise KeyframeError(f"--keyframes: {model.export_dir} is a {model.mode}-mode model "
                            f"without colour memory ({why}): it cannot carry a keyframe's "
                            "colour on")
    if args.keyframes.is_dir():
        if args.keyframe_frames is not None or args.keyframe_at_cuts:
            raise KeyframeError(f"{args.keyframes}: a folder of keyframes is indexed by its "
                                "file names; --keyframe-frames/--keyframe-at-cuts are for a "
                                "keyframe video")
        stage = KeyframeFolder(args.keyframes, source.width, source.height, source.frames)
        print(f"keyframes: {len(stage.frames)} from {args.keyframes}", file=sys.stderr)
        return stage
    if not args.keyframes.exists():
        raise KeyframeError(f"{args.keyframes}: no such file or folder")
    at = parse_frame_list(args.keyframe_frames) if args.keyframe_frames is not None else None
    return KeyframeVideo(args.keyframes, source.width, source.height, source.frames, at,
                         args.keyframe_at_cuts)


class Terminated(BaseException):
    """SIGTERM (a scheduler's or `kill`'s stop): unwinds like Ctrl-C, so the sink is aborted
    and nothing is left under OUT's name or a temporary one."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup finish
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except (ModelError, VideoError, OutputError, KeyframeError) as e:
        print(f"tricolor-colorize: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tricolor-colorize: interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated:
        print("tricolor-colorize: terminated (SIGTERM); no output written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
