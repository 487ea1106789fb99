"""Building the Accelerator of this launch, and refusing contradictory settings before any work.

The Accelerate config file picks the backend: `launch/deepspeed_zero{1,2}.yaml` say
`distributed_type: DEEPSPEED` (Accelerate then sets ACCELERATE_USE_DEEPSPEED=true in every
rank); every other launch config gives DDP, the default (trainer/backends/). One Accelerator
refuses two DeepSpeed models in one `prepare`, so under DeepSpeed G and D get one plugin each
("G", "D"), prepared one after the other (trainer/backends/deepspeed.py).

On CPU (tests) the DeepSpeed process group is gloo (`InitProcessGroupKwargs`), and DeepSpeed's
shared-memory all-reduce op, used only for inference all-reduce, is not compiled (it is a C++
build of about 90 s on 2 cores at the first launch).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


class LaunchConfigError(ValueError):
    """The launch config and the tricolor config disagree; the message says which to change."""


def deepspeed_requested() -> bool:
    """True when `accelerate launch` ran with a DeepSpeed config (distributed_type DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg, precision: str) -> Accelerator:
    """The Accelerator for this launch: DDP by default, two DeepSpeed plugins under a
    DeepSpeed launch config. Raises LaunchConfigError for contradictory settings."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # Accelerate's default (NCCL: 10 min) is shorter than a start-up scan of a large dataset or
    # a long validation with skewed ranks; past it the watchdog kills the run.
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.train.dist_timeout_min))
    if not deepspeed_requested():
        # broadcast_buffers: D's only buffers are the spectral-norm u, v, which
        # trainer/sn_sync.py broadcasts after every step; G's are the (Sync)BatchNorm statistics,
        # already the same on every rank under SyncBatchNorm. gradient_as_bucket_view: the
        # gradients live in DDP's buckets, no second copy.
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False,
                                            gradient_as_bucket_view=True)
        return Accelerator(mixed_precision=precision,
                           gradient_accumulation_steps=cfg.train.grad_accum,
                           kwargs_handlers=[ddp, timeout])
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        raise LaunchConfigError(
            "ACCELERATE_USE_CPU=true turns Accelerate's DeepSpeed integration off; the DeepSpeed "
            "launch configs run CPU ranks on gloo without it: unset ACCELERATE_USE_CPU")
    if not _gpu_per_local_rank():
        # Without an explicit gloo group Accelerate counts 1 process while DeepSpeed builds
        # a group of WORLD_SIZE ranks (its batch-size check then fails).
        timeout = InitProcessGroupKwargs(backend="gloo", timeout=timeout.timeout)
        _skip_shm_comm_build()
    accelerator = Accelerator(mixed_precision=precision,
                              gradient_accumulation_steps=cfg.train.grad_accum,
                              deepspeed_plugins=deepspeed_plugins(cfg, precision),
                              kwargs_handlers=[timeout])
    assert accelerator.distributed_type == DistributedType.DEEPSPEED, accelerator.distributed_type
    return accelerator


def _gpu_per_local_rank() -> bool:
    """Whether this launch can put each rank of this node on its own visible GPU (NCCL), else
    CPU ranks on gloo. Decided from the launch, not from `torch.cuda.is_available()` alone: CPU
    ranks on a GPU host (the tests set CUDA_VISIBLE_DEVICES="") or more ranks than GPUs would
    otherwise get NCCL and fail. LOCAL_WORLD_SIZE, not LOCAL_RANK, so that every rank of a node
    picks the same backend."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return torch.cuda.is_available() and local_world <= torch.cuda.device_count()


def _skip_shm_comm_build() -> None:
    """DeepSpeed compiles a shared-memory all-reduce (C++, ~90 s on 2 cores) when its CPU
    backend starts; only `inference_all_reduce` uses it, training all-reduces go through gloo.
    Marking the op incompatible (DeepSpeed keeps this dict for the whole process) skips it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# DeepSpeed config sections per train.mixed_precision (the launch file never sets precision).
DEEPSPEED_PRECISION = {
    "no": {"bf16": {"enabled": False}, "fp16": {"enabled": False}},
    "bf16": {"bf16": {"enabled": False}, "fp16": {"enabled": False},
             "torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
    # Native fp16: each engine has its own dynamic loss scaler (loss_scale 0 = dynamic),
    # saved in its checkpoint. GPU only (DeepSpeed refuses fp16 on CPU).
    "fp16": {"bf16": {"enabled": False},
             "fp16": {"enabled": True, "auto_cast": True, "loss_scale": 0,
                      "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                      "min_loss_scale": 1}},
}


def deepspeed_plugins(cfg, precision: str) -> dict:
    """One DeepSpeedPlugin per network. ZeRO stage and offload come from the launch config
    (environment set by `accelerate launch`); batch, accumulation, clipping and precision
    from the tricolor config, and a launch setting that contradicts them is an error."""
    from accelerate.utils import DeepSpeedPlugin

    for env, key, ours in (
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "train.grad_accum", cfg.train.grad_accum),
        ("ACCELERATE_GRADIENT_CLIPPING", "optim.grad_clip", cfg.optim.grad_clip),
    ):
        value = os.environ.get(env, "auto")
        if value != "auto" and float(value) != float(ours):
            raise LaunchConfigError(
                f"the launch config sets {env.removeprefix('ACCELERATE_').lower()}={value} but "
                f"{key}={ours}: set it in the tricolor config only (remove it from the launch "
                "config)")
    owned = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        **DEEPSPEED_PRECISION[precision],
    }
    plugins = {}
    for name in ("G", "D"):
        plugin = DeepSpeedPlugin(gradient_accumulation_steps=cfg.train.grad_accum,
                                 gradient_clipping=cfg.optim.grad_clip)
        ds = plugin.deepspeed_config
        if plugin.zero_stage not in (1, 2):
            raise LaunchConfigError(
                f"ZeRO stage {plugin.zero_stage} is not supported: use "
                "launch/deepspeed_zero1.yaml or deepspeed_zero2.yaml. ZeRO-3 partitions the "
                "weights themselves, which the EMA of G, the G step's direct call of the frozen "
                "D and the spectral-norm logs read whole every step; at these model sizes it "
                "would save little over ZeRO-2 (docs/deepspeed.md)")
        offload = {k: v.get("device", "none") for k, v in ds.get("zero_optimization", {}).items()
                   if k.startswith("offload_") and isinstance(v, dict)}
        if any(device != "none" for device in offload.values()):
            raise LaunchConfigError(
                f"ZeRO offload ({offload}) is not supported (untested: it swaps Adam for "
                "DeepSpeed's CPU Adam); set offload_optimizer_device and offload_param_device "
                "to none")
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise LaunchConfigError(
                    f"the DeepSpeed config file sets '{key}': tricolor builds Adam and its "
                    "learning-rate schedule from the optim.* settings; remove the section")
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            if ds.get(key, "auto") not in ("auto", owned[key]):
                raise LaunchConfigError(
                    f"the DeepSpeed config file sets {key}={ds[key]}; tricolor sets it from "
                    "data.batch_size, train.grad_accum and optim.grad_clip: use 'auto' or "
                    "remove it")
        for section in ("bf16", "fp16", "torch_autocast"):
            if str(ds.get(section, {}).get("enabled", False)).lower() == "true" \
                    and not owned.get(section, {}).get("enabled"):
                raise LaunchConfigError(
                    f"the DeepSpeed config file enables '{section}'; tricolor sets the "
                    f"precision sections from train.mixed_precision (now {precision!r}; bf16 "
                    "runs as torch_autocast): remove the section")
        ds.update(owned)
        plugins[name] = plugin
    return plugins


# -- train.mixed_precision `auto` -----------------------------------------------------------

def launched_on_cuda() -> bool:
    """Whether this rank will compute on a CUDA device: what Accelerate's PartialState will
    pick, decided before it is built (the precision is an argument of the Accelerator).
    CPU ranks are asked for with ACCELERATE_USE_CPU=true (also on a GPU host) or get no
    usable GPU (none, or CUDA_VISIBLE_DEVICES="")."""
    from accelerate.utils import parse_flag_from_env

    return not parse_flag_from_env("ACCELERATE_USE_CPU") and torch.cuda.is_available()


def precision(cfg) -> str:
    """`auto`: bf16 on GPUs with native bf16 (Ampere and later; emulated bf16 on older ones is
    slow), fp32 elsewhere, CPU ranks on a GPU host included (CPU bf16 is slow, not wrong)."""
    choice = cfg.train.mixed_precision.value
    if choice != "auto":
        return choice
    if not launched_on_cuda():
        return "no"
    # asked of the current device (cuda:0 before Accelerate picks this rank's): a node's GPUs
    # are alike, and every rank must choose the same precision
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
