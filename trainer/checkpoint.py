"""Sharded, atomic, resumable checkpoints: one component writes and reads all of them.

Layout of `runs/<name>/checkpoints/`:

    step_000200/            a complete checkpoint (never a partial one under this name)
        .metadata, *.distcp     DDP: G, D, G_ema, both optimizers through
                                torch.distributed.checkpoint (every rank writes its part;
                                loads at any world size)
        G/, D/, G_ema.safetensors   DeepSpeed instead: each engine's own checkpoint
                                (`engine.save_checkpoint`, a ZeRO partition per rank; loads
                                at the same world size only) and the EMA of G
        rank0.safetensors ...   per rank: RNG state and the data loader's DALI state
        rank0.json ...          per rank: the loader's position (epoch, step, fingerprint)
        trainer.json            step, samples seen, schedulers, model config, world size,
                                backend (ddp, or deepspeed and its ZeRO stage)
        COMPLETE                written last, after every rank has finished
    step_000400.tmp/        being written (or left by a crash): never loaded
    latest                  "step_000400", replaced atomically once step_000400 is complete

Publication: every rank writes into `step_N.tmp/`; after a barrier rank 0 writes COMPLETE,
renames the directory to `step_N/`, replaces `latest` (temp file + fsync + rename) and only
then deletes checkpoints beyond the last `keep`. The model and optimizer part is the
backend's (trainer/backend.py); the rest is the same for both. Nothing of the DDP format
unpickles: tensors come from DCP and safetensors, everything else from JSON. DeepSpeed's own
files are pickles (torch.load): resume only checkpoints you wrote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from shards.atomic import fsync_dir

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class IncompatibleCheckpoint(CheckpointError):
    """Intact, but not for this run as launched (another model config, backend, ZeRO stage or,
    for DeepSpeed, world size): an older checkpoint of the run would not do either."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _write_text_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int = 3):
        self.dir = run_dir / "checkpoints"
        self.keep = keep

    # -- saving -----------------------------------------------------------------------------

    def save(self, step: int, gan, trainer_state: dict, loader_state: dict) -> Path:
        """Collective: every rank calls it at the same step boundary."""
        rank, world = _rank_world()
        final = self.dir / f"step_{step:06d}"
        tmp = self.dir / f"step_{step:06d}.tmp"
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash: never trusted, never reused
            tmp.mkdir(parents=True)
        _barrier()
        written = gan.backend.save_state(gan, tmp)  # G, D, G_ema, optimizers
        dali = loader_state.get("source")
        tensors = {"rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["rng_cuda"] = torch.cuda.get_rng_state()
        if dali is not None:
            tensors["dali"] = torch.frombuffer(bytearray(dali), dtype=torch.uint8)
        save_file(tensors, str(tmp / f"rank{rank}.safetensors"))
        position = {k: v for k, v in loader_state.items() if k != "source"}
        (tmp / f"rank{rank}.json").write_text(json.dumps(position))
        if rank == 0:
            (tmp / "trainer.json").write_text(json.dumps(
                {**trainer_state, "world_size": world, "backend": gan.backend.describe()},
                indent=2))
        # each rank flushes its own files before the barrier
        for f in written + [f for f in tmp.iterdir() if f.name.startswith(f"rank{rank}.")]:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _barrier()
        if rank == 0:
            _write_text_atomic(tmp / COMPLETE, f"{world}\n")
            if final.exists():  # an older save of the same step (e.g. rerun): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            _write_text_atomic(self.dir / "latest", final.name + "\n")
            self._prune()
        _barrier()
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep)]:
            shutil.rmtree(old)

    # -- finding ----------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
        return sorted((p for p in found if (p / COMPLETE).exists()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if pointer.exists():
            return self.dir / pointer.read_text().strip()
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    # -- loading ----------------------------------------------------------------------------

    def _check(self, path: Path, model_cfg, backend) -> dict:
        """Structural checks before any tensor is read; returns trainer.json."""
        if not (path / COMPLETE).exists():
            raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker)")
        state_file = path / "trainer.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{state_file}: unreadable ({e})") from None
        saved = state.get("model")
        current = OmegaConf.to_container(OmegaConf.structured(model_cfg), enum_to_str=True)
        if saved != current:
            diff = {k: (saved.get(k) if saved else None, v) for k, v in current.items()
                    if not saved or saved.get(k) != v}
            raise IncompatibleCheckpoint(
                f"{state_file}: saved with another model config (saved, now): {diff}; "
                "use the run's own config, or start over with --no-resume or a new name"
            )
        backend.check_state(path, {"world_size": state["world_size"],
                                   **state.get("backend", {"name": "ddp"})})
        world = state["world_size"]
        for r in range(world):
            for suffix in ("safetensors", "json"):
                f = path / f"rank{r}.{suffix}"
                if not f.exists():
                    raise CheckpointError(f"{f}: missing (saved on {world} ranks)")
        return state

    def load(self, path: Path, gan, model_cfg) -> tuple[dict, dict | None, dict | None]:
        """Load `path` into `gan`; return (trainer state, this rank's loader position or
        None, its DALI bytes and RNG or None when the world size changed)."""
        state = self._check(path, model_cfg, gan.backend)
        gan.backend.load_state(gan, path)
        rank, world = _rank_world()
        if state["world_size"] != world:
            log.warning("%s was saved on %d ranks, resuming on %d: model and optimizer state "
                        "are resharded; the data epoch restarts", path, state["world_size"],
                        world)
            position = json.loads((path / "rank0.json").read_text())
            position["source"] = None
            return state, position, None
        position = json.loads((path / f"rank{rank}.json").read_text())
        try:
            tensors = load_file(str(path / f"rank{rank}.safetensors"))
        except Exception as e:
            raise CheckpointError(f"{path / f'rank{rank}.safetensors'}: unreadable ({e})") \
                from None
        position["source"] = bytes(tensors["dali"].numpy()) if "dali" in tensors else None
        return state, position, tensors

    def restore(self, gan, model_cfg, explicit: Path | None = None):
        """Resume from `explicit`, else from `latest`, falling back (with a warning) to the
        previous complete checkpoints when `latest` is damaged. None when there is none."""
        if explicit is not None:
            return explicit, self.load(explicit, gan, model_cfg)
        latest = self.latest()
        if latest is None:
            return None
        candidates = [latest] + [p for p in reversed(self.complete_checkpoints())
                                 if p != latest]
        errors = []
        for path in candidates:
            try:
                return path, self.load(path, gan, model_cfg)
            except IncompatibleCheckpoint:
                raise  # every checkpoint of the run is like that: not a damage
            except CheckpointError as e:
                errors.append(str(e))
                log.warning("cannot resume from %s: %s; trying the previous checkpoint", path, e)
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
