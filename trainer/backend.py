"""The one place where the two distributed backends differ: plain DDP and DeepSpeed ZeRO.

The Accelerate config file picks the backend: `launch/deepspeed_zero{1,2}.yaml` say
`distributed_type: DEEPSPEED` (Accelerate then sets ACCELERATE_USE_DEEPSPEED=true in every
rank); every other launch config gives DDP, the default. The training loop and the GAN step
are the same for both; a Backend only answers these questions:

    prepare        wrap G, D and their optimizers (DDP modules, or one DeepSpeed engine each)
    autocast       the mixed-precision context for forwards that run outside a wrapper
    backward_step  backward of one network's loss, then at an accumulation boundary gradient
                   clipping, the norm and the optimizer step (DeepSpeed: inside its engine),
                   skipped on every rank when the loss or the gradients are not finite
    end_step       once per training step, after both networks (the fp16 GradScaler's update)
    save_state / check_state / load_state    G, D, G_ema and both optimizers in a checkpoint
                   directory (DCP for DDP, DeepSpeed's own sharded files for DeepSpeed);
                   trainer/checkpoint.py publishes that directory atomically

DeepSpeed specifics (see docs/deepspeed.md):
- One Accelerator refuses two DeepSpeed models in one `prepare`, so G and D get one plugin
  each ("G", "D") and are prepared one after the other with `select_deepspeed_plugin`.
- `accelerator.backward` only knows the last engine; each engine is driven directly.
- D is frozen during the G step (trainer/step.py): ZeRO-2 fails otherwise ("already been
  reduced") and ZeRO-1 silently steps D on G's gradients.
- bf16 runs as DeepSpeed's `torch_autocast` (fp32 weights, bf16 compute): the same numerics as
  the DDP path, the spectral-norm power iteration stays fp32. fp16 runs as DeepSpeed's native
  fp16 (fp16 weights, fp32 master copy in the ZeRO optimizer, one dynamic loss scaler per
  engine); torch_autocast fp16 under ZeRO clips on loss-scaled gradients and skips overflowing
  steps without lowering its scale, so it is not used.
- On CPU (tests) the process group is gloo (`InitProcessGroupKwargs`), and DeepSpeed's
  shared-memory all-reduce op, used only for inference all-reduce, is not compiled (it is a
  C++ build of about 90 s on 2 cores at the first launch).
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainer.checkpoint import CheckpointError, IncompatibleCheckpoint, _write_failure
from trainer.sn_sync import spectral_norm_buffers


class LaunchConfigError(ValueError):
    """The launch config and the tricolor config disagree; the message says which to change."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ranks_finite(value: Tensor) -> bool:
    """Whether `value` is finite on every rank (a host decision: one sync)."""
    ok = torch.isfinite(value.detach().float()).all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]


# -- choosing the backend and building the Accelerator ---------------------------------------

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


def make_backend(accelerator: Accelerator):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(accelerator)
    return DDPBackend(accelerator)


# -- plain DDP (the default) -----------------------------------------------------------------

class DDPBackend:
    """Accelerate's DDP: one `prepare` for both networks and Accelerate's autocast; the
    optimizer step and the fp16 GradScaler are driven here, with no host synchronization (see
    `backward_step`); the sharded state is a torch.distributed.checkpoint (loads at any world
    size).

    fp16: one GradScaler scale per training step (`end_step` updates it once, also when
    optim.d_steps_per_g steps D more than once). A non-finite loss is skipped through the same
    `found_inf` as an overflow (its NaN gradients reach the scaler's inf check), so besides
    counting as `Skipped/*` it also multiplies the scale by backoff_factor (halves it) once,
    as an overflow would; the scale grows back after growth_interval clean steps. Accepted:
    such losses are rare, and GradScaler has no way to skip a step without backing off."""

    name = "ddp"

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._nonfinite_loss: dict[int, Tensor] = {}  # fp16: per optimizer, this window
        self._scaler_stepped: set[int] = set()  # fp16: optimizers stepped since the update

    def describe(self) -> dict:
        return {"name": self.name}

    @staticmethod
    def adam(params, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        """Fused Adam: it takes the skip decision as a device tensor (`found_inf`), so a
        non-finite step is skipped without the host reading a flag (`backward_step`)."""
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)

    def prepare(self, G, D, opt_G, opt_D):
        """G and D wrapped in DDP; the optimizers are returned unwrapped. Accelerate's
        AcceleratedOptimizer would step the GradScaler and update its scale after each of the
        two optimizers (GradScaler wants one update per iteration) and decide on the host
        whether to step; `backward_step` and `end_step` do both on the device instead."""
        for opt in (opt_G, opt_D):
            assert opt.defaults.get("fused"), "build the DDP optimizers with DDPBackend.adam"
        G, D, opt_G, opt_D = self.accelerator.prepare(G, D, opt_G, opt_D)
        # The raw optimizers are also what the checkpoint's DCP state-dict helpers get
        # (`_sharded_state`, `load_state`); they must never see an AcceleratedOptimizer (issue
        # 18, M1): on a fresh process `set_optimizer_state_dict` creates the empty Adam state
        # with `step()`, which the wrapper routes through GradScaler.step, and that asserts
        # before any `scale()`: every fp16 resume would crash.
        return G, D, opt_G.optimizer, opt_D.optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        # keep_torch_compile=False: with a dynamo backend, the default re-points the compiled
        # wrapper at the raw module, silently bypassing DDP's gradient all-reduce afterwards.
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def autocast(self):
        return self.accelerator.autocast()

    def backward_step(self, loss: Tensor, model, optimizer, grad_clip: float):
        """Backward of one network's loss and, at an accumulation boundary, clipping to
        `grad_clip` (0: none) and the optimizer step. Returns (gradient norm before clipping,
        or None between boundaries; skipped as non-finite; skipped by the fp16 scaler), the
        last two 0-dim float tensors (0 or 1) on the device. Nothing here reads a tensor on the
        host.

        The skip is decided from the gradients, on the device: a non-finite loss on this rank
        is made to give NaN gradients (`gate`: its backward multiplies every gradient by NaN,
        and NaN * 0 is NaN too), DDP's all-reduce carries them to every rank, and every rank
        then sees the same non-finite reduced gradients and skips alike. Under gradient
        accumulation the NaN stays in the accumulated gradients: the whole window is skipped.
        Fused Adam skips on `found_inf` (its step counters too)."""
        accelerator, scaler = self.accelerator, self.accelerator.scaler
        nonfinite = torch.isfinite(loss.detach()).logical_not()
        gate = torch.where(nonfinite, float("nan"), 1.0).to(loss.dtype)
        accelerator.backward(loss * gate)  # / grad_accum, and * the fp16 scale
        zero = torch.zeros((), device=loss.device)
        if scaler is not None:  # OR over the window; the scaler's skip is classified below
            previous = self._nonfinite_loss.get(id(optimizer), nonfinite)
            self._nonfinite_loss[id(optimizer)] = previous | nonfinite
        if not accelerator.sync_gradients:
            return None, zero, zero
        if scaler is not None:
            if id(optimizer) in self._scaler_stepped:
                self._keep_for_update(scaler, optimizer)
            scaler.unscale_(optimizer)  # this optimizer only; records found_inf for update()
        params = [p for p in model.parameters() if p.grad is not None]
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:  # the norm only: no multiply by 1 (and no inf / inf = NaN)
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        found_inf = torch.isfinite(norm).logical_not().float()  # the same on every rank
        if scaler is None:
            optimizer.found_inf = found_inf
            try:
                optimizer.step()
            finally:  # a stale flag would skip or pass a later step that is not ours
                del optimizer.found_inf
            skipped, overflow = found_inf, zero
        else:
            # GradScaler sets found_inf (from its unscale_, the same inf check) on a fused
            # optimizer and always calls its step. A window with a non-finite loss on some
            # rank counts as skipped, else as an fp16 overflow: the one flag the gradients
            # cannot tell, reduced on the device (fp16 only).
            scaler.step(optimizer)
            self._scaler_stepped.add(id(optimizer))
            bad = self._nonfinite_loss.pop(id(optimizer)).float()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            skipped, overflow = found_inf * bad, found_inf * (1 - bad)
        optimizer.zero_grad(set_to_none=True)
        return norm, skipped, overflow

    @staticmethod
    def _keep_for_update(scaler, optimizer) -> None:
        """A second step of one optimizer before `end_step` (optim.d_steps_per_g > 1).
        GradScaler allows one unscale_/step per optimizer between two updates ("unscale_() is
        being called after step()"). An `update()` here would be the wrong way out: this
        pass's loss was already scaled by the current scale in its backward, and so were the
        other network's gradients accumulated in this window; a changed scale would unscale
        them by a different factor. Instead the scale stays the same for the whole step: the
        earlier step's record (its found_inf) is moved to a key of its own, where `update()`
        still reads it (it reads every record, then drops them all), and this optimizer starts
        a fresh one. GradScaler's `_per_optimizer_states` is private; its layout (id ->
        {"stage", "found_inf_per_device"}) has been the same since torch 1.6."""
        states = scaler._per_optimizer_states
        record = states.pop(id(optimizer))
        states[(id(optimizer), len(states))] = record  # a key of no optimizer, unique

    def end_step(self) -> None:
        """Once per training step, after both networks: GradScaler's one `update` per
        iteration (backs off if any step of either network overflowed, grows after
        growth_interval clean iterations). Only when the scaler stepped something since its
        last update: between accumulation boundaries nothing was unscaled."""
        scaler = self.accelerator.scaler
        if scaler is not None and self._scaler_stepped:
            scaler.update()
            self._scaler_stepped.clear()

    def trainer_state(self) -> dict:
        scaler = self.accelerator.scaler
        return {"scaler": scaler.state_dict() if scaler is not None else None}

    def load_trainer_state(self, state: dict) -> None:
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])

    # checkpoint state: G, D, G_ema and both optimizers through DCP
    @staticmethod
    def _sharded_state(gan) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        return {
            "G": get_model_state_dict(gan.G),
            "D": get_model_state_dict(gan.D),
            "G_ema": gan.ema.state_dict(),
            "opt_G": get_optimizer_state_dict(gan.G, gan.opt_G),  # raw optimizers: `prepare`
            "opt_D": get_optimizer_state_dict(gan.D, gan.opt_D),
        }

    def save_state(self, gan, directory: Path) -> list[Path]:
        """Collective. Returns the files this rank wrote (to fsync): DCP names a rank's
        shards `__<rank>_<n>.distcp` and rank 0, the coordinator, writes `.metadata`
        (torch/distributed/checkpoint/filesystem.py). Not the other ranks' files: fsyncing
        those would cost O(world) opens per rank on a shared file system, and through another
        node's client flush nothing."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(gan), checkpoint_id=str(directory))
        rank, _ = _rank_world()
        written = sorted(directory.glob(f"__{rank}_*.distcp"))
        return written + [directory / ".metadata"] if rank == 0 else written

    def check_state(self, directory: Path, saved: dict) -> None:
        if saved.get("name", "ddp") != self.name:
            raise IncompatibleCheckpoint(
                f"{directory / 'trainer.json'}: saved by the {saved['name']} backend "
                f"({_describe(saved)}); resume it with the launch config it was trained with")
        from trainer.safe_unpickle import METADATA, load_metadata

        load_metadata(directory / METADATA)  # refuses a crafted or damaged one, by name

    def load_state(self, gan, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from trainer.safe_unpickle import SafePlanner, SafeReader

        sharded = self._sharded_state(gan)
        try:  # DCP's own reader and planner would unpickle (trainer/safe_unpickle.py)
            dcp.load(sharded, storage_reader=SafeReader(directory),
                     planner=SafePlanner(directory))
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            raise CheckpointError(_dcp_failure(e, directory)) from None
        set_model_state_dict(gan.G, sharded["G"])
        set_model_state_dict(gan.D, sharded["D"])
        gan.ema.load_state_dict(sharded["G_ema"])
        set_optimizer_state_dict(gan.G, gan.opt_G, sharded["opt_G"])
        set_optimizer_state_dict(gan.D, gan.opt_D, sharded["opt_D"])


def _dcp_failure(e: BaseException, directory: Path) -> str:
    """One line for a failed dcp.load: our own CheckpointError (it names the file) from
    whichever rank raised it, else the first line of the underlying error."""
    from torch.distributed.checkpoint.api import CheckpointException

    causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) \
        else [e]
    for cause in causes:
        if isinstance(cause, CheckpointError):
            return str(cause)
    return f"{directory}: cannot read the sharded state ({_first_line(causes[0])})"


def _describe(saved: dict) -> str:
    if saved.get("name") == "deepspeed":
        return f"DeepSpeed ZeRO-{saved.get('zero_stage')}"
    return "DDP"


# -- DeepSpeed ZeRO ----------------------------------------------------------------------------

def _deepspeed_globals() -> list:
    """The DeepSpeed classes in a ZeRO-1/2 checkpoint besides tensors and plain values (found
    with torch.serialization.get_unsafe_globals_in_checkpoint on our own checkpoints: the
    optimizer files hold LossScaler, ZeroStageEnum and fragment_address; the dynamic fp16
    scaler's classes are added unverified). Data classes and enums: building them runs no
    user code under the weights_only unpickler."""
    from deepspeed.runtime.fp16.loss_scaler import (
        DynamicLossScaler,
        LossScaleConfig,
        LossScaleProfile,
        LossScaler,
    )
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, LossScaleConfig, LossScaleProfile, ZeroStageEnum,
            fragment_address]


def deepspeed_weights_only_load(path: str, map_location=None):
    """Stands in for DeepSpeed's TorchCheckpointEngine.load (`torch.load(weights_only=False)`):
    tensors, plain values and the classes of `_deepspeed_globals` only; anything else is
    refused with a CheckpointError naming the file."""
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = next((x for x in lines[1:] if "global" in x.lower()), lines[0])
        raise CheckpointError(f"{path}: refused ({reason.strip()})") from None


@contextlib.contextmanager
def _held_writes(engine, writes: list):
    """While DeepSpeed saves, every file write of its save (DeepSpeed 0.19.8: the checkpoint
    engine's `makedirs` and `save`, rank 0's copy of the recovery scripts) is appended to
    `writes` as (write, path) instead of done; DeepSpeed's collectives run as usual. The state
    dicts held meanwhile reference the live tensors, which nothing changes before the writes."""
    ckpt = engine.checkpoint_engine
    save, makedirs, copy_scripts = ckpt.save, ckpt.makedirs, engine._copy_recovery_script

    def save_to_file(state_dict, path):
        # into an open file (torch.save takes one): torch's zip writer given a path reports a
        # failed write only as "unexpected pos", given a file it keeps the OSError as context
        with open(path, "wb") as f:
            save(state_dict, f)

    ckpt.save = lambda state_dict, path: writes.append(
        (lambda: save_to_file(state_dict, path), path))
    ckpt.makedirs = lambda path, exist_ok=False: writes.append(
        (lambda: makedirs(path, exist_ok=exist_ok), path))
    engine._copy_recovery_script = lambda path: writes.append((lambda: copy_scripts(path), path))
    try:
        yield
    finally:
        ckpt.save, ckpt.makedirs, engine._copy_recovery_script = save, makedirs, copy_scripts


class DeepSpeedBackend:
    """G and D as two DeepSpeed engines (ZeRO stage from the launch config). Clipping,
    accumulation, loss scaling and the optimizer step happen inside each engine; the state
    is DeepSpeed's own checkpoint (`engine.save_checkpoint`) in `G/` and `D/`, plus
    `G_ema.safetensors`. DeepSpeed checkpoints load only at the world size they were saved at."""

    name = "deepspeed"

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        plugin = accelerator.state.get_deepspeed_plugin("G")
        self.zero_stage = plugin.zero_stage
        ds = plugin.deepspeed_config
        # low-precision compute dtype (None: fp32), and whether the weights themselves are in
        # it (DeepSpeed's native fp16/bf16) or stay fp32 (torch_autocast)
        self.dtype, self.native = None, False
        for section, dtype, native in (("torch_autocast", None, False),
                                       ("fp16", torch.float16, True),
                                       ("bf16", torch.bfloat16, True)):
            if ds.get(section, {}).get("enabled"):
                self.dtype = dtype or getattr(torch, ds[section].get("dtype", "bfloat16"))
                self.native = native
                break

    def describe(self) -> dict:
        return {"name": self.name, "zero_stage": self.zero_stage}

    @staticmethod
    def adam(params, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        """Plain Adam: the ZeRO optimizer wraps it and decides its steps itself."""
        return torch.optim.Adam(params, lr=lr, betas=betas)

    def prepare(self, G, D, opt_G, opt_D):
        accelerator, state = self.accelerator, self.accelerator.state
        for name, module in (("G", G), ("D", D)):
            # DeepSpeed's default buckets hold 5e8 elements each (2 GB in fp32, allocated per
            # engine and per reduction dtype): far more than these networks. One bucket the
            # size of the network is enough; a value from a DeepSpeed JSON is kept.
            zero = state.get_deepspeed_plugin(name).deepspeed_config["zero_optimization"]
            numel = -(-sum(p.numel() for p in module.parameters()) // 64) * 64  # aligned
            for key in ("reduce_bucket_size", "allgather_bucket_size"):
                if zero.get(key, "auto") == "auto":
                    zero[key] = min(500_000_000, numel)
        try:
            state.select_deepspeed_plugin("G")
            G, opt_G = accelerator.prepare(G, opt_G)
            # `accelerator.backward` would drive this one engine whatever the loss: unset,
            # so that a stray call fails instead of stepping the wrong network
            accelerator.deepspeed_engine_wrapped = None
            state.select_deepspeed_plugin("D")
            D, opt_D = accelerator.prepare(D, opt_D)
            accelerator.deepspeed_engine_wrapped = None
        finally:
            state.select_deepspeed_plugin("G")
        for engine in (G, D):
            module = engine.module
            if self.native:  # DeepSpeed casts the parameters only; u, v must follow
                for buf in spectral_norm_buffers(module).values():
                    buf.data = buf.data.to(self.dtype)
            # DeepSpeed broadcasts rank 0's parameters, not buffers (DDP does both)
            if dist.is_available() and dist.is_initialized():
                for buf in module.buffers():
                    dist.broadcast(buf.data, 0)
        return G, D, opt_G, opt_D

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def autocast(self):
        """For forwards that do not go through an engine (D in the G step): the engines
        autocast (torch_autocast) or cast their inputs (native fp16) themselves."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=self.dtype)

    def backward_step(self, loss: Tensor, engine, optimizer, grad_clip: float):
        """As DDPBackend.backward_step (same return values). The engine scales by
        1/accumulation (and the fp16 loss scale), reduces, and at a boundary clips to
        `gradient_clipping` (= optim.grad_clip) and steps. The non-finite skip stays a host
        decision here, agreed across ranks: DeepSpeed reads its overflow flag and norm on the
        host in every step anyway, and a skipped phase must clear its ZeRO buffers
        (`discard_gradients`). A non-finite loss between boundaries drops that micro-batch
        only (DDP: its whole window)."""
        zero = torch.zeros((), device=loss.device)
        if not _all_ranks_finite(loss):
            self.discard_gradients(loss, engine, optimizer)
            return None, torch.ones((), device=loss.device), zero
        boundary = self.accelerator.sync_gradients
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(loss)
        if not boundary:  # inside no_sync (ZeRO-1) a step is illegal, and a no-op anyway
            return None, zero, zero
        engine.step()
        optimizer.step()  # a no-op wrapper (the engine stepped); keeps LambdaLR's order check
        norm = engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32,
                               device=loss.device)
        return norm, zero, torch.full((), float(not engine.was_step_applied()),
                                      device=loss.device)

    def end_step(self) -> None:
        pass  # each engine updates its own loss scale in its step

    def discard_gradients(self, loss: Tensor, engine, optimizer) -> None:
        """A phase skipped at an accumulation boundary drops what the window's earlier
        micro-batches accumulated, as the DDP path's zero_grad does. DeepSpeed keeps that in
        its ZeRO buffers; its own overflow path clears them: a backward of a NaN loss, then
        a step that every rank agrees to skip. (With native fp16 this also halves the loss
        scale once.) Nothing was accumulated when grad_accum is 1."""
        accelerator = self.accelerator
        if not accelerator.sync_gradients or accelerator.gradient_accumulation_steps == 1:
            return
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(loss * float("nan"))
        engine.step()
        assert not engine.was_step_applied(), "DeepSpeed stepped on NaN gradients"

    def trainer_state(self) -> dict:
        return {"scaler": None}  # the fp16 loss scalers are in each engine's checkpoint

    def load_trainer_state(self, state: dict) -> None:
        pass

    # checkpoint state: DeepSpeed's own files, one tag directory per engine
    def save_state(self, gan, directory: Path) -> list[Path]:
        """Collective. `engine.save_checkpoint` runs collectives between its file writes
        (barriers, the tag check): a write failing inside it on one rank would take that rank
        out while the others wait in the next barrier, a hang. So both engines save with
        their writes held back (`_held_writes`), and this rank does them once no collective
        is left: a failure is then an error of this rank alone, naming the file, which the
        checkpointer's agreement turns into the same CheckpointError on every rank."""
        rank, _ = _rank_world()
        writes: list = []
        for tag, engine in (("G", gan.G), ("D", gan.D)):
            with _held_writes(engine, writes):
                engine.save_checkpoint(str(directory), tag=tag, client_state={},
                                       save_latest=False)
        for write, path in writes:
            try:
                write()
            except Exception as e:
                raise CheckpointError(_write_failure(e, Path(path))) from None
        written = [f for tag in ("G", "D") for f in (directory / tag).iterdir()
                   if f"zero_pp_rank_{rank}_" in f.name or (rank == 0 and "zero_pp" not in f.name)]
        if rank == 0:
            ema = {k: v.detach().cpu().contiguous() for k, v in gan.ema.state_dict().items()}
            save_file(ema, str(directory / "G_ema.safetensors"))
            written.append(directory / "G_ema.safetensors")
        return written

    def check_state(self, directory: Path, saved: dict) -> None:
        _, world = _rank_world()
        where = directory / "trainer.json"
        if saved.get("name", "ddp") != self.name:
            raise IncompatibleCheckpoint(
                f"{where}: saved by the DDP backend; the DeepSpeed launch configs cannot resume "
                "it: resume with the launch config it was trained with, or start over with "
                "--no-resume or a new name")
        if saved.get("zero_stage") != self.zero_stage:
            raise IncompatibleCheckpoint(
                f"{where}: saved with DeepSpeed ZeRO-{saved.get('zero_stage')}, this launch "
                f"uses ZeRO-{self.zero_stage}: resume with "
                f"launch/deepspeed_zero{saved.get('zero_stage')}.yaml")
        if saved["world_size"] != world:
            raise IncompatibleCheckpoint(
                f"{directory}: a DeepSpeed ZeRO-{self.zero_stage} checkpoint saved on "
                f"{saved['world_size']} ranks cannot be resumed on {world}: each rank's "
                "optimizer state is a partition tied to the world size. Resume with "
                f"--num_processes {saved['world_size']}, or start over from the exported "
                "generator with --no-resume (see docs/deepspeed.md, 'Changing the world size')")
        for tag in ("G", "D"):
            folder = directory / tag
            if not any(folder.glob("*model_states.pt")):
                raise CheckpointError(f"{folder}: no DeepSpeed model states (*model_states.pt)")
            for r in range(world):
                if not any(folder.glob(f"*zero_pp_rank_{r}_*optim_states.pt")):
                    raise CheckpointError(f"{folder}/zero_pp_rank_{r}_*optim_states.pt: missing "
                                     f"(saved on {world} ranks)")
        if not (directory / "G_ema.safetensors").exists():
            raise CheckpointError(f"{directory / 'G_ema.safetensors'}: missing")

    def load_state(self, gan, directory: Path) -> None:
        """Every rank loads; a failure on any rank fails all of them together (no rank goes
        on alone into the next collective). DeepSpeed's `.pt` files are read with
        `deepspeed_weights_only_load`, not DeepSpeed's own unrestricted torch.load."""
        error = None
        try:
            for tag, engine in (("G", gan.G), ("D", gan.D)):
                # DeepSpeed's loader is torch.load(weights_only=False): read with ours
                engine.checkpoint_engine.load = deepspeed_weights_only_load
                try:
                    path, _ = engine.load_checkpoint(
                        str(directory), tag=tag, load_optimizer_states=True,
                        load_lr_scheduler_states=False)
                except Exception as e:
                    raise CheckpointError(f"{directory / tag}: cannot read the DeepSpeed "
                                          f"checkpoint ({_first_line(e)})") from None
                if path is None:
                    raise CheckpointError(f"{directory / tag}: DeepSpeed found no checkpoint there")
            ema_file = directory / "G_ema.safetensors"
            try:
                gan.ema.load_state_dict(load_file(str(ema_file)))
            except Exception as e:
                raise CheckpointError(f"{ema_file}: unreadable ({_first_line(e)})") from None
        except CheckpointError as e:
            error = str(e)
        errors = [error]
        if dist.is_available() and dist.is_initialized():
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if failed:
            raise CheckpointError(failed[0])
