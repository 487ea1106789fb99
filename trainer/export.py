"""The inference export: the EMA generator as safetensors plus its settings as JSON.

No pickle anywhere: `export/generator.safetensors` holds the tensors, `generator.json` the
model config (architecture, normalization, mode) and the format version; together they are
everything `tricolor-colorize` needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from models import build_generator
from models.config import ModelConfig

# /2: the generator with the first seed's widths (2026-11-30); a /1 export holds the earlier
# generator, whose weights do not fit it, and is refused by name.
EXPORT_FORMAT = "tricolor-generator/2"


def export_generator(G: nn.Module, model_cfg, out_dir: Path, step: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    config = OmegaConf.to_container(OmegaConf.structured(model_cfg), resolve=True, enum_to_str=True)
    meta = {"format": EXPORT_FORMAT, "step": step, "model": config}
    # Written under temporary names, then renamed: a reader never sees half an export.
    weights, settings = out_dir / "generator.safetensors", out_dir / "generator.json"
    save_file(tensors, str(weights) + ".partial", metadata={"format": EXPORT_FORMAT})
    Path(str(settings) + ".partial").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(str(weights) + ".partial", weights)
    os.replace(str(settings) + ".partial", settings)


def load_generator(export_dir: Path) -> tuple[nn.Module, dict]:
    meta = json.loads((export_dir / "generator.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{export_dir / 'generator.json'}: not a {EXPORT_FORMAT} export")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    G = build_generator(cfg)
    G.load_state_dict(load_file(str(export_dir / "generator.safetensors")))
    return G.eval(), meta
