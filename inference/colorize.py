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
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from torch import Tensor, nn
from tqdm import tqdm

from inference.keyframes import (
    KeyframeError,
    KeyframeFolder,
    KeyframeVideo,
    is_greyscale,
    parse_frame_list,
)
from inference.video_io import (
    DEFAULT_CRF,
    DEFAULT_PRESET,
    FRAMES_MARKER,
    X264_PRESETS,
    FrameFolderSink,
    OutputError,
    Source,
    VideoSink,
    check_not_input,
    check_output,
    output_kind,
    remove_stale_temporaries,
)
from models.colour import (
    CANNY_HIGH,
    CANNY_LOW,
    compose_grey,
    lab_to_uint8,
    line_art,
    resize,
    rgb_to_lab_triplets,
    to_uint8,
)
from models.export import load_generator
from models.memory import memory_of, no_memory_like
from shards.scenes import SceneCuts
from shards.video import VIDEO_SUFFIXES, VideoError, open_video

DEFAULT_SHORT_SIDE = 256  # when the run does not say: `tricolor-shards build`'s default
SCENE_THRESHOLD = 27.0  # `tricolor-shards build --scene-threshold` default


class ModelError(Exception):
    """A model directory that cannot be used; the message names the file and why."""


# --- the model and its training settings ---------------------------------------------------


@dataclass
class Model:
    G: nn.Module
    mode: str  # "grey" or "lineart"
    depth: int
    export_dir: Path
    step: int
    short_side: int | None  # of the training frames, None when the run does not say
    short_side_from: str  # where short_side came from, or why it is unknown
    canny: tuple[float, float]  # line-art mode: the Canny thresholds of training
    memory: bool = False  # G takes the previous colour (line-art mode; grey with memory)

    @property
    def takes_keyframes(self) -> bool:
        """Whether a keyframe's colour can carry on: G has a memory and uses it."""
        return self.memory and getattr(self.G, "temporal", True)

    def with_temporal(self, temporal: bool) -> Model:
        """The same weights with `temporal` set: False is the per-frame ablation (grey: frame
        t stands in for its neighbours; line art: never a colour hint)."""
        G = copy.copy(self.G)  # a shallow copy: the same modules and weights
        G.temporal = temporal
        return replace(self, G=G)


def find_export(path: Path) -> Path:
    """The export folder of RUN_OR_EXPORT_DIR: itself, or the run's `export/`."""
    for candidate in (path, path / "export"):
        if (candidate / "generator.json").is_file():
            return candidate
    if not path.exists():
        raise ModelError(f"{path}: no such folder")
    raise ModelError(f"{path}: no model export here (expected generator.json and "
                     "generator.safetensors, or a run folder with export/)")


def training_settings(export_dir: Path) -> tuple[int | None, str, tuple[float, float]]:
    """(short side of the training frames, where it came from, Canny thresholds), read from
    the run's resolved `config.yaml` beside `export/` and its shards' `manifest.json`."""
    canny = (CANNY_LOW, CANNY_HIGH)
    cfg_path = export_dir.parent / "config.yaml"
    if not cfg_path.is_file():
        return None, f"no run config.yaml beside {export_dir}", canny
    try:
        cfg = OmegaConf.load(cfg_path)
        canny = (float(OmegaConf.select(cfg, "data.canny_low", default=canny[0])),
                 float(OmegaConf.select(cfg, "data.canny_high", default=canny[1])))
        shards = OmegaConf.select(cfg, "data.shards", default=None)
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise ModelError(f"{cfg_path}: not a readable run config ({e})") from e
    if not shards:
        return None, f"{cfg_path} names no shards", canny
    manifest = Path(shards) / "manifest.json"  # as the trainer saw it: relative to its cwd
    try:
        short = int(json.loads(manifest.read_text())["params"]["short_side"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{manifest} not readable", canny
    return short, str(manifest), canny


def load_model(path: Path, device: torch.device) -> Model:
    export_dir = find_export(Path(path))
    try:
        G, meta = load_generator(export_dir)
        mode, depth = str(meta["model"]["mode"]), int(meta["model"]["depth"])
        memory = mode == "lineart" or bool(meta["model"].get("memory", False))
    except (ValueError, RuntimeError, KeyError, TypeError, OSError, SafetensorError,
            OmegaConfBaseException) as e:
        # Wrong format, weights of another architecture, a damaged or missing file.
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        raise ModelError(f"{export_dir / 'generator.safetensors'} cannot be loaded with "
                         f"{export_dir / 'generator.json'} by this version of tricolor: "
                         f"{reason}") from e
    short, short_from, canny = training_settings(export_dir)
    return Model(G.to(device).eval(), mode, depth, export_dir, int(meta.get("step", 0)),
                 short, short_from, canny, memory)


def working_size(width: int, height: int, short_side: int, depth: int) -> tuple[int, int]:
    """(w, h): short side `short_side`, aspect kept, each rounded to a multiple of 2**depth."""
    m = 2**depth
    scale = short_side / min(width, height)
    return tuple(max(m, int(round(x * scale / m)) * m) for x in (width, height))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


# --- frames in, frames out -----------------------------------------------------------------


@dataclass
class Item:
    """One frame on its way through: the full-resolution input, its scene and G's condition
    at the working resolution ([1, h, w] in [-1, 1]: L, or line art), what the colorizers
    made of it (name -> RGB uint8 [H, W, 3]) and, if one is given, its colour keyframe (RGB
    uint8 at the input's size)."""

    index: int
    rgb: np.ndarray
    pts: int | None
    scene: int
    cond: Tensor
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    keyframe: np.ndarray | None = None  # its colour is given (inference/keyframes.py)


@torch.inference_mode()
def prepare(frames: Iterable, size: tuple[int, int], model: Model, device: torch.device,
            fps: float, threshold: float = SCENE_THRESHOLD,
            lineart_input: bool = False) -> Iterator[Item]:
    """Decoded frames (`video_io.Frame`) -> Items: resized to `size` (w, h), scene ids,
    and the condition computed exactly as in training (`rgb_to_lab_triplets`, `line_art`)."""
    cuts = None
    for index, frame in enumerate(frames):
        small = cv2.resize(frame.rgb, size, interpolation=cv2.INTER_AREA)
        if cuts is None:
            cuts = SceneCuts(fps, threshold / 3 if is_greyscale(small) else threshold)
        scene = cuts.push(small)
        lab = rgb_to_lab_triplets(torch.from_numpy(small).to(device)[None, None])[0, 0]
        if model.mode == "grey" or lineart_input:
            cond = lab[:1]
        else:
            cond = line_art(lab[None], *model.canny)[0]
        yield Item(index, frame.rgb, frame.pts, scene, cond)


def condition_image(item: Item, mode: str) -> np.ndarray:
    """What G was given, at full resolution, for --side-by-side: the greyscale frame, or the
    line art (upsampled)."""
    if mode == "grey":
        return compose_grey(item.rgb, torch.zeros(2, 1, 1, device=item.cond.device))
    H, W = item.rgb.shape[:2]
    return to_uint8(((resize(item.cond, H, W) + 1) / 2).expand(3, -1, -1))


class Colorizer:
    """Colours a stream of Items with G, as the model was trained (see the module doc).

    `colorizer(items, key)` yields the same Items in order, each with `outputs[key]` set;
    a generator, so the next stage can consume frames while later ones are still decoding.
    A G with colour memory runs recurrently, one frame at a time: its memory is its own
    previous output, a keyframe's colour, or none at a scene's first frame. At a keyframe the
    output is the keyframe's colour on the input's luminance (grey mode) or the keyframe
    itself (line-art mode).
    """

    def __init__(self, model: Model, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size

    def __call__(self, items: Iterable[Item], key: str) -> Iterator[Item]:
        frames = self._windows(items) if self.model.mode == "grey" else (
            (item, item.cond[None]) for item in items)
        if self.model.memory:
            return self._recurrent(frames, key)
        return self._batched(frames, key)

    @staticmethod
    def _window(prev: Item | None, cur: Item, nxt: Item | None) -> Tensor:
        """L of (t-1, t, t+1) [1, 3, 1, h, w], padded with t at the ends and across cuts."""
        p = prev if prev is not None and prev.scene == cur.scene else cur
        n = nxt if nxt is not None and nxt.scene == cur.scene else cur
        return torch.stack([p.cond, cur.cond, n.cond])[None]

    def _windows(self, items: Iterable[Item]) -> Iterator[tuple[Item, Tensor]]:
        prev = cur = None
        for nxt in items:
            if cur is not None:  # frame t is ready once t+1 (and its scene) is known
                yield cur, self._window(prev, cur, nxt)
            prev, cur = cur, nxt
        if cur is not None:
            yield cur, self._window(prev, cur, None)

    def _batched(self, frames: Iterable[tuple[Item, Tensor]], key: str) -> Iterator[Item]:
        batch: list[tuple[Item, Tensor]] = []
        for frame in frames:
            batch.append(frame)
            if len(batch) == self.batch_size:
                yield from self._run_batch(batch, key)
                batch = []
        yield from self._run_batch(batch, key)

    @torch.inference_mode()
    def _run_batch(self, batch: list[tuple[Item, Tensor]], key: str) -> Iterator[Item]:
        if not batch:
            return
        ab = self.model.G(torch.cat([w for _, w in batch])).float()  # [B, 2, h, w]
        for (item, _), item_ab in zip(batch, ab):
            given = keyframe_colour(item, self.model.mode)
            item.outputs[key] = compose_grey(item.rgb, item_ab if given is None else given)
            yield item

    @torch.inference_mode()
    def _recurrent(self, frames: Iterable[tuple[Item, Tensor]], key: str) -> Iterator[Item]:
        mode, memory, scene = self.model.mode, None, None
        for item, frame in frames:
            given = keyframe_colour(item, self.model.mode)
            if given is not None:  # the keyframe's colour, and the memory goes on from it
                colour = F.interpolate(given[None], frame.shape[-2:], mode="area")
            else:
                if memory is None or item.scene != scene:  # a scene's first frame
                    memory = no_memory_like(item.cond[None], mode)
                colour = self.model.G(frame, memory).float()  # a,b or Lab [1, C, h, w]
            memory, scene = memory_of(colour, item.cond[None]), item.scene
            if mode == "grey":
                item.outputs[key] = compose_grey(item.rgb, colour[0] if given is None else given)
            elif item.keyframe is not None:
                item.outputs[key] = item.keyframe
            else:
                item.outputs[key] = lab_to_uint8(colour[0], *item.rgb.shape[:2])
            yield item


def keyframe_colour(item: Item, mode: str) -> Tensor | None:
    """The item's keyframe as G's colour at the input's size: normalized a,b [2, H, W]
    (grey mode) or Lab [3, H, W], on the item's device; None without a keyframe."""
    if item.keyframe is None:
        return None
    rgb = torch.from_numpy(item.keyframe).to(item.cond.device)[None, None]
    lab = rgb_to_lab_triplets(rgb)[0, 0]
    return lab[1:] if mode == "grey" else lab


# --- many videos: slurm/colorize.sbatch ---------------------------------------------------


class BatchError(Exception):
    """A batch that cannot be planned (no inputs, two inputs for one output); says why."""


def output_complete(path: Path) -> bool:
    """Whether `path` holds a finished output of this tool. Outputs appear under their name
    only when complete (written under a temporary name, then renamed), so this is False only
    for something else put there: a video file that does not open as a video with frames, or
    a folder without the frames marker and frames. False when nothing is there."""
    path = Path(path)
    if path.is_dir():
        names = set(os.listdir(path))
        return FRAMES_MARKER in names and any(n.startswith("frame_") for n in names)
    if not path.is_file():
        return False
    try:
        container, stream = open_video(path)
        with container:
            return stream.frames > 0 or next(container.decode(stream), None) is not None
    except (VideoError, av.error.FFmpegError, OSError, UnicodeDecodeError):
        return False


def batch_plan(inputs: Path, out_dir: Path, suffix: str = ".mp4") -> list[tuple[Path, Path]]:
    """(input video, output path) for every video of `inputs`, in a fixed order that every
    array task computes alike. `inputs` is a folder (its videos, searched recursively;
    hidden files and anything under `out_dir` left out; the output keeps the path under the
    folder: IN/a/x.mov -> OUT/a/x.mp4) or a list file (one path per line, relative to the
    current folder; blank lines and # comments skipped; a file listed twice, in any
    spelling, taken once; OUT/<name>.mp4). Two different inputs for one output (the same name
    in two folders of a list, x.mov beside x.mp4) are refused (BatchError), naming them:
    nothing is silently overwritten or renamed."""
    inputs, out_dir = Path(inputs), Path(out_dir)
    out_abs = out_dir.resolve()
    pairs: list[tuple[Path, Path]] = []
    if inputs.is_dir():
        for p in sorted(inputs.rglob("*")):
            rel = p.relative_to(inputs)
            if (p.suffix.lower() not in VIDEO_SUFFIXES or p.is_dir()
                    or any(part.startswith(".") for part in rel.parts)
                    or p.resolve() == out_abs or out_abs in p.resolve().parents):
                continue
            pairs.append((p, out_dir / rel.with_suffix(suffix)))
    elif inputs.is_file():
        try:
            lines = inputs.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BatchError(f"{inputs}: cannot read the list ({e})") from e
        seen: set[Path] = set()
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            # One file under two spellings (relative and absolute, `..`, a symbolic link) is
            # listed twice: colorized once, under its first spelling.
            real = p.resolve()
            if real in seen:
                continue
            seen.add(real)
            pairs.append((p, out_dir / (p.stem + suffix)))
    else:
        raise BatchError(f"{inputs}: no such folder or list file")
    if not pairs:
        raise BatchError(f"{inputs}: no videos ({', '.join(sorted(VIDEO_SUFFIXES))})"
                         if inputs.is_dir() else f"{inputs}: lists no videos")
    by_output: dict[Path, list[Path]] = {}
    for src, out in pairs:
        by_output.setdefault(out, []).append(src)
    clashes = [(out, srcs) for out, srcs in by_output.items() if len(srcs) > 1]
    if clashes:
        shown = "; ".join(f"{' and '.join(map(str, srcs))} -> {out}" for out, srcs in clashes[:5])
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise BatchError(f"{len(clashes)} output name(s) would be written by two inputs: "
                         f"{shown}{more}. Rename the inputs, or colorize them in separate "
                         "batches with separate output folders")
    return pairs


def batch_task(inputs: Path, out_dir: Path, task: int, tasks: int,
               suffix: str = ".mp4") -> list[tuple[str, Path, Path]]:
    """Array task `task` of `tasks`: videos task, task + tasks, ... of `batch_plan`, each as
    (status, input, output): "todo", "done" (a complete output exists: skipped) or
    "blocked" (something that is not a complete output is in the way: left alone)."""
    if not 0 <= task < tasks:
        raise BatchError(f"task {task} of {tasks}: not a task of this array")
    result = []
    for src, out in batch_plan(inputs, out_dir, suffix)[task::tasks]:
        if output_complete(out):
            status = "done"
        elif out.exists() or out.is_symlink():
            status = "blocked"
        else:
            status = "todo"
        result.append((status, src, out))
    return result


def batch_task_main(argv: list[str]) -> int:
    """`python -c 'from inference.colorize import batch_task_main as m; m([...])'` for
    slurm/colorize.sbatch: argv INPUTS OUT_DIR TASK TASKS; writes status, input and output of
    each video of the task to stdout, NUL-terminated; exit 2 with a message on a BatchError."""
    inputs, out_dir, task, tasks = argv
    try:
        rows = batch_task(Path(inputs), Path(out_dir), int(task), int(tasks))
    except BatchError as e:
        print(f"tricolor-colorize: error: {e}", file=sys.stderr)
        return 2
    for status, src, out in rows:
        sys.stdout.write(f"{status}\0{src}\0{out}\0")
    sys.stdout.flush()
    return 0


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


def resolve_size(model: Model, width: int, height: int, size: int | None) -> tuple[
        tuple[int, int], str]:
    """The working (w, h) and a line saying where its short side came from."""
    if size is not None:
        short, why = size, "--size"
    elif model.short_side is not None:
        short, why = model.short_side, f"training frames, {model.short_side_from}"
    else:
        short, why = DEFAULT_SHORT_SIDE, f"default; {model.short_side_from}"
    return working_size(width, height, short, model.depth), f"short side {short} ({why})"


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
