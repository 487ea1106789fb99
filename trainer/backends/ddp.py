"""Plain DDP, the default backend (see trainer/backends/__init__.py for the interface)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor, nn

from trainer.backends.common import first_line, rank_world
from trainer.checkpoint import CheckpointError, IncompatibleCheckpoint


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
        rank, _ = rank_world()
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
    return f"{directory}: cannot read the sharded state ({first_line(causes[0])})"


def _describe(saved: dict) -> str:
    if saved.get("name") == "deepspeed":
        return f"DeepSpeed ZeRO-{saved.get('zero_stage')}"
    return "DDP"
