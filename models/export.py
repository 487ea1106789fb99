"""The inference export: the EMA generator as safetensors plus its settings as JSON.

No pickle anywhere: `export/generator.safetensors` holds the tensors, `generator.json` the
model config (architecture, normalization, mode) and the format version; together they are
everything `tricolor-colorize` needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models import build_generator, has_memory
from models.config import ModelConfig
from shards.atomic import PARTIAL_SUFFIX, publish, write_json_atomic

# /2: the generator with the 3-frame GAN's widths; a /1 export holds the earlier, narrower
# generator, whose weights do not fit it, and is refused by name.
EXPORT_FORMAT = "tricolor-generator/2"
# Frame sides must be multiples of 2**depth: beyond 16 (65536 pixels) no frame fits, and a
# settings file saying depth=100000 would take minutes to build even on the meta device.
MAX_DEPTH = 16


def export_generator(G: nn.Module, model_cfg, out_dir: Path, step: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    config = OmegaConf.to_container(OmegaConf.structured(model_cfg), resolve=True, enum_to_str=True)
    meta = {"format": EXPORT_FORMAT, "step": step, "model": config}
    # Written under temporary names, flushed, then renamed: a reader never sees half an export.
    weights = out_dir / "generator.safetensors"
    partial = weights.with_name(weights.name + PARTIAL_SUFFIX)
    try:
        save_file(tensors, str(partial), metadata={"format": EXPORT_FORMAT})
        publish(partial, weights)
    finally:
        partial.unlink(missing_ok=True)
    write_json_atomic(out_dir / "generator.json", meta)


def load_generator(export_dir: Path) -> tuple[nn.Module, dict]:
    """The exported G and its settings. The settings are checked against the weights' shapes
    before G is built, so a `generator.json` that does not describe its weights (e.g. a huge
    `ngf`) is refused with a ValueError without allocating anything."""
    meta = json.loads((export_dir / "generator.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{export_dir / 'generator.json'}: not a {EXPORT_FORMAT} export")
    if meta["model"].get("mode") == "lineart" and "memory" not in meta["model"]:
        raise ValueError(f"{export_dir / 'generator.json'}: a line-art export made before the "
                         "colour-memory generator: its weights do not fit this "
                         "version's line-art G; export it with that version, or retrain")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    weights = export_dir / "generator.safetensors"
    check_shapes(cfg, weights)
    G = build_generator(cfg)
    G.load_state_dict(load_file(str(weights)))
    return G.eval(), meta


def check_shapes(cfg, weights: Path) -> None:
    """ValueError unless the tensors G built from `cfg` would have are exactly those in
    `weights` (names and shapes). Both sides cost no memory: G is built on the meta device
    (shapes only), after a bound on its depth (the number of its layers), and safetensors
    reads only the file's header."""
    settings = ", ".join(f"{k}={getattr(cfg[k], 'value', cfg[k])}"
                         for k in ("mode", "ngf", "depth", "norm"))
    settings += f", memory={has_memory(cfg)}"
    if not 1 <= cfg.depth <= MAX_DEPTH:
        raise ValueError(f"the settings ({settings}) say depth={cfg.depth}: expected 1.."
                         f"{MAX_DEPTH} (frame sides must be multiples of 2**depth)")
    try:
        with torch.device("meta"):
            G = build_generator(cfg)
    except (TypeError, OverflowError, RuntimeError) as e:  # e.g. sizes beyond int64
        raise ValueError(f"the settings ({settings}) cannot build a generator: "
                         f"{str(e).splitlines()[0]}") from e
    expected = {k: tuple(v.shape) for k, v in G.state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if stored == expected:
        return
    other = OmegaConf.merge(cfg, {"memory": not cfg.memory})
    with torch.device("meta"):
        if {k: tuple(v.shape) for k, v in build_generator(other).state_dict().items()} == stored:
            raise ValueError(f"the settings say memory={cfg.memory}, but the weights are those "
                             f"of a G {'without' if cfg.memory else 'with'} colour memory "
                             f"(model.memory={not cfg.memory}): settings and weights of "
                             "different models")
    missing, extra = [k for k in expected if k not in stored], sorted(stored.keys() - expected)
    if missing or extra:
        raise ValueError(f"the settings ({settings}) do not describe these weights: "
                         f"{len(missing)} tensors missing (e.g. {missing[:1]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:1]})")
    key = next(k for k in expected if expected[k] != stored[k])  # the first, in G's order
    raise ValueError(f"the settings ({settings}) do not describe these weights: {key} "
                     f"would be {list(expected[key])}, the file holds {list(stored[key])}")
