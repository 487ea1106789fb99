"""DeepSpeed ZeRO-1/2: G and D as two DeepSpeed engines (see docs/deepspeed.md; the interface
is in trainer/backends/__init__.py, the plugins in trainer/launch.py).

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
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainer.backends.common import first_line, rank_world
from trainer.checkpoint import CheckpointError, IncompatibleCheckpoint, write_failure
from trainer.sn_sync import spectral_norm_buffers


def _all_ranks_finite(value: Tensor) -> bool:
    """Whether `value` is finite on every rank (a host decision: one sync)."""
    ok = torch.isfinite(value.detach().float()).all().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


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
        rank, _ = rank_world()
        writes: list = []
        for tag, engine in (("G", gan.G), ("D", gan.D)):
            with _held_writes(engine, writes):
                engine.save_checkpoint(str(directory), tag=tag, client_state={},
                                       save_latest=False)
        for write, path in writes:
            try:
                write()
            except Exception as e:
                raise CheckpointError(write_failure(e, Path(path))) from None
        written = [f for tag in ("G", "D") for f in (directory / tag).iterdir()
                   if f"zero_pp_rank_{rank}_" in f.name or (rank == 0 and "zero_pp" not in f.name)]
        if rank == 0:
            ema = {k: v.detach().cpu().contiguous() for k, v in gan.ema.state_dict().items()}
            save_file(ema, str(directory / "G_ema.safetensors"))
            written.append(directory / "G_ema.safetensors")
        return written

    def check_state(self, directory: Path, saved: dict) -> None:
        _, world = rank_world()
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
                                          f"checkpoint ({first_line(e)})") from None
                if path is None:
                    raise CheckpointError(f"{directory / tag}: DeepSpeed found no checkpoint there")
            ema_file = directory / "G_ema.safetensors"
            try:
                gan.ema.load_state_dict(load_file(str(ema_file)))
            except Exception as e:
                raise CheckpointError(f"{ema_file}: unreadable ({first_line(e)})") from None
        except CheckpointError as e:
            error = str(e)
        errors = [error]
        if dist.is_available() and dist.is_initialized():
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if failed:
            raise CheckpointError(failed[0])
