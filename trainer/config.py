"""One typed configuration tree for the whole system.

Defaults live in the dataclasses below, presets in `configs/*.yaml`, and `key=value`
overrides come from the command line (`data.batch_size=16`). OmegaConf checks every key and
type against the dataclasses, so a typo or a wrong type stops the run before any work
starts, with an error that names the key and where it came from.

    python -m trainer.config configs/demo.yaml train.epochs=2   # print the resolved config
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.colour import CANNY_HIGH, CANNY_LOW
from models.config import LossConfig, ModelConfig, check_loss_config, check_model_config


class Backend(str, Enum):
    dali = "dali"  # GPU decoding with NVIDIA DALI (CPU decoding on hosts without a GPU)
    webdataset = "webdataset"  # torch DataLoader over the webdataset library: the fallback


class Precision(str, Enum):
    auto = "auto"  # bf16 where the device supports it, else fp32
    bf16 = "bf16"
    fp16 = "fp16"  # GPU only; uses a gradient scaler
    no = "no"  # fp32


@dataclass
class DataConfig:
    shards: str = MISSING  # directory written by `tricolor-shards build` (holds manifest.json)
    backend: Backend = Backend.dali
    batch_size: int = 8  # triplets per process per step
    crop_size: int = 128  # side of the random square crop, pixels; a multiple of 2**model.depth
    flip: bool = True  # random horizontal flip, the same for the three frames of a triplet
    brightness_jitter: float = 0.0  # max relative brightness change (same for all 3); 0 = off
    canny_low: float = CANNY_LOW  # line-art mode: Canny hysteresis thresholds on gradients
    canny_high: float = CANNY_HIGH  # of L in [0, 1]
    num_threads: int = 2  # DALI CPU threads, or DataLoader workers, per process
    # DALI's reader maps the tar files (fast on local disks); false reads them with plain
    # reads, which most network filesystems (Lustre, NFS) serve better
    mmap: bool = True
    # validation reads this many samples of the val split (a fixed, evenly spaced subset:
    # the same pixels at every validation); 0 = all of them
    val_samples: int = 0
    # samples that fail while read (damaged since the shards were indexed) are skipped and
    # counted per loader and process; past this many the run stops, naming the last one
    max_bad_samples: int = 100


@dataclass
class OptimConfig:
    lr_g: float = 2e-4  # Adam learning rates
    lr_d: float = 2e-4
    beta1: float = 0.5  # 0.5 as in pix2pix/DCGAN: less momentum keeps the GAN game stable
    beta2: float = 0.999
    grad_clip: float = 0.0  # max gradient norm per network; 0 = no clipping
    d_steps_per_g: int = 1  # discriminator updates per generator update (same batch)
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps (batches / grad_accum)
    decay: str = "none"  # after warm-up: "none" (constant), "linear" or "cosine" to 0


@dataclass
class TrainConfig:
    epochs: int = 1
    # stop after this many batches (micro-steps; optimizer steps = batches / grad_accum);
    # 0 = run all epochs
    max_steps: int = 0
    mixed_precision: Precision = Precision.auto
    # G and D weights (so activations) in NHWC: what oneDNN's and cuDNN's fastest convolutions
    # read; the same maths in another memory layout (docs/benchmarks.md: the measured gain)
    channels_last: bool = False
    seed: int = 0
    grad_accum: int = 1  # batches per optimizer step (gradient accumulation)
    ema_decay: float = 0.999  # exponential moving average of G, evaluated and exported
    # consecutive skipped (non-finite) updates before the run stops: optimizer steps, so
    # with grad_accum > 1 on DDP one per accumulation window (read at log/checkpoint steps)
    max_nonfinite: int = 20
    log_every: int = 10  # steps between scalar logs
    image_every: int = 100  # steps between image grids in TensorBoard; 0 = never
    val_every: int = 200  # steps between validations (and at the end); 0 = only at the end
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only at the end (and on stop)
    keep_checkpoints: int = 3  # most recent complete checkpoints kept on disk (>= 1)
    # steps between the ranks' agreement on a stop request (a signal or the stop file): one
    # host sync each time, so not every step; checkpoint steps and the last step always agree
    stop_check_every: int = 10
    # process-group timeout: a collective that waits longer (a rank stuck in start-up or a
    # long validation) fails the run instead of hanging it
    dist_timeout_min: float = 30.0


@dataclass
class Config:
    name: str = "default"  # the run lives in <runs_dir>/<name>/
    runs_dir: str = "runs"
    resume_from: str = ""  # a checkpoint directory (runs/x/checkpoints/step_N); "" = latest
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Ranges of the numeric settings: (key, test, what the message says is expected). Each of
# these values, out of range, would crash a run later (after the process group is up) or,
# worse, run and write a wrong result: keep_checkpoints=0 deletes every checkpoint right
# after writing it, max_steps=-5 writes COMPLETE and exports an untrained G, max_nonfinite=0
# reports a non-finite loss that never happened. Checked before anything is started.
RANGES = [
    *[(key, lambda v: v >= 1, ">= 1") for key in (
        "data.batch_size", "data.crop_size", "data.num_threads", "optim.d_steps_per_g",
        "train.epochs", "train.grad_accum", "train.max_nonfinite", "train.log_every",
        "train.keep_checkpoints", "train.stop_check_every")],
    *[(key, lambda v: v >= 0, ">= 0") for key in (
        "train.max_steps", "train.image_every", "train.val_every", "train.checkpoint_every",
        "optim.warmup_steps", "optim.grad_clip", "data.val_samples",
        "data.max_bad_samples")],
    # under a second, a process group times out before gloo or NCCL can even connect
    ("train.dist_timeout_min", lambda v: v >= 1 / 60, ">= 1/60 (minutes: one second)"),
    *[(key, lambda v: v > 0, "> 0 (a learning rate of 0 trains nothing)")
      for key in ("optim.lr_g", "optim.lr_d")],
    *[(key, lambda v: 0 <= v < 1, "in [0, 1)") for key in (
        "optim.beta1", "optim.beta2", "train.ema_decay", "data.brightness_jitter")],
    # numpy's seed (accelerate's set_seed, plus the rank) and the loaders' seeds
    ("train.seed", lambda v: 0 <= v < 2**31, "in [0, 2**31)"),
]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the file or override."""


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    # YAML reads an unquoted `no` as false: `train.mixed_precision: no` means Precision.no
    if OmegaConf.select(other, "train.mixed_precision", default=None) is False:
        other.train.mixed_precision = "no"
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{source}: key '{key}': {msg}") from None


def check(cfg: DictConfig, require_data: bool = False) -> None:
    """Cross-field checks; `require_data` also checks that the shard directory exists."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"required keys not set: {', '.join(missing)} (set them in the YAML file or "
            "on the command line as key=value)"
        )
    # inf (YAML .inf, or 1e999 on the command line) and nan pass most range tests and
    # surface only later, as a non-finite loss or a zero timeout: refused here for every key
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"key '{key}': must be a finite number, got {value}")
    for section, check_section in (("model", check_model_config), ("loss", check_loss_config)):
        try:
            check_section(cfg[section])
        except ValueError as e:
            key, _, msg = str(e).partition(": ")  # the checks say "field: problem"
            raise ConfigError(f"key '{section}.{key}': {msg}") from None
    step = 2**cfg.model.depth
    if cfg.data.crop_size % step:
        raise ConfigError(
            f"key 'data.crop_size': {cfg.data.crop_size} is not a multiple of "
            f"2**model.depth = {step}"
        )
    for key, ok, expected in RANGES:
        value = OmegaConf.select(cfg, key)
        # written as "not ok" so that nan (which OmegaConf accepts for floats) fails too
        if not (ok(value) and math.isfinite(value)):
            raise ConfigError(f"key '{key}': must be {expected}, got {value}")
    if cfg.optim.decay not in ("none", "linear", "cosine"):
        raise ConfigError(f"key 'optim.decay': {cfg.optim.decay!r}, expected none|linear|cosine")
    name = Path(cfg.name)
    if not cfg.name or name.is_absolute() or ".." in name.parts or name == Path("."):
        raise ConfigError(f"key 'name': {cfg.name!r} is not a directory name inside runs_dir")
    if not 0 <= cfg.data.canny_low <= 1:
        raise ConfigError(f"key 'data.canny_low': must lie in [0, 1], got {cfg.data.canny_low}")
    if not cfg.data.canny_low < cfg.data.canny_high <= 1:
        raise ConfigError(
            f"key 'data.canny_high': must lie in (data.canny_low = {cfg.data.canny_low}, 1], "
            f"got {cfg.data.canny_high}"
        )
    if require_data and not (Path(cfg.data.shards) / "manifest.json").is_file():
        raise ConfigError(
            f"key 'data.shards': {cfg.data.shards} holds no manifest.json; build shards "
            "with `tricolor-shards build VIDEOS --out DIR` first"
        )


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of the config tree."""
    for key, value in node.items():
        if isinstance(value, DictConfig):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def memory_bytes() -> int:
    """What one training process can hold: its GPU's memory, or the host's RAM without one."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg: DictConfig, available: int | None = None) -> None:
    """Refuse a model or batch that cannot fit in `available` bytes (default: memory_bytes()),
    before anything is allocated. The estimate is a lower bound, so nothing that could run
    is refused: 16 bytes a parameter (fp32 weight, gradient and Adam's two moments) and
    2 bytes an activation kept for the backward (bf16, the smallest precision we train in)."""
    from models.summary import footprint

    available = memory_bytes() if available is None else available
    model = OmegaConf.to_object(cfg.model)
    sizes = footprint(model, cfg.data.crop_size, cfg.data.batch_size)
    weights = 16 * (sizes["G_params"] + sizes["D_params"])
    activations = 2 * (sizes["G_activations"] + sizes["D_activations"])
    if weights + activations <= available:
        return
    gib = 2**30
    if weights >= activations:
        key = "model.ndf" if sizes["D_params"] > sizes["G_params"] else "model.ngf"
        what = f"{weights / gib:,.1f} GiB for the weights, gradients and Adam state of G and D"
    else:
        key = "data.batch_size"
        what = (f"{activations / gib:,.1f} GiB for the activations of a batch at "
                f"data.crop_size={cfg.data.crop_size}")
    raise ConfigError(
        f"key '{key}': {OmegaConf.select(cfg, key)} needs at least {what}, more than the "
        f"{available / gib:,.1f} GiB one process has here; lower {key}"
    )


def load_config(
    path: str | Path | None, overrides: list[str] = (), require_data: bool = False
) -> DictConfig:
    """Defaults <- YAML file <- `key=value` overrides, checked; raises ConfigError."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends: report, do not guess
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    check(cfg, require_data)
    OmegaConf.set_readonly(cfg, True)  # nothing changes the config behind the user's back
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        print("usage: python -m trainer.config CONFIG.yaml [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
