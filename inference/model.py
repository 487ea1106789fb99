"""A trained generator for inference: its export, its training settings, its device.

    model = load_model(RUN_OR_EXPORT_DIR, pick_device("auto"))  # Model: G, mode, memory, ...
    (w, h), why = resolve_size(model, width, height, size)     # the working resolution

The export (`generator.json` + `generator.safetensors`, models/export.py) is a run's
`export/` folder or given directly. The run's resolved `config.yaml` beside it and its shards'
`manifest.json` say the short side of the frames it was trained on (the working resolution's
default) and the Canny thresholds of its line art. Used by `tricolor-colorize`
(inference/colorize.py) and `tricolor-eval` (inference/evaluate.py).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from torch import nn

from models.colour import CANNY_HIGH, CANNY_LOW
from models.export import load_generator

DEFAULT_SHORT_SIDE = 256  # when the run does not say: `tricolor-shards build`'s default


class ModelError(Exception):
    """A model directory that cannot be used; the message names the file and why."""


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
