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
backend's (trainer/backends/); the rest is the same for both.

Ranks decide together: each step a rank does alone (writing its files, reading and checking
them) ends in an exchange of outcomes (`_agree`), so that all ranks go on, fall back to an
older checkpoint, or stop with the same error naming the file; none is left waiting in a
collective. A failed save (a full disk) removes `step_N.tmp/` and stops every rank, under
DeepSpeed too: its writes are done after its collective steps (DeepSpeedBackend.save_state).

A checkpoint is read only from its own files: before anything in it is read, a symlink
under its folder (a `.distcp`, `G/` or `trainer.json` pointing elsewhere), a FIFO, socket or
device there, or a `step_N` of the run that is itself a symlink is refused naming it, and the
ranks fall back together as for a damaged checkpoint. The folder's own path may lead anywhere
(the user's choice); a hard link cannot be told from the file it links and is read.

Loading a DDP checkpoint runs no code from it: DCP's `.metadata` goes through a restricted
unpickler and its other entries through `torch.load(weights_only=True)`
(trainer/safe_unpickle.py); the rest is safetensors and JSON. DeepSpeed's own files are
pickles (see DeepSpeedBackend.load_state).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from models.config import ModelConfig
from shards.atomic import fsync_dir, write_text_atomic

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"
INIT_ONLY = ("zero_init_head",)  # model settings that only choose the starting weights


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class IncompatibleCheckpoint(CheckpointError):
    """Intact, but not for this run as launched (another model config, backend, ZeRO stage or,
    for DeepSpeed, world size): an older checkpoint of the run would not do either."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(failure: tuple[str, str] | None) -> tuple[str, str] | None:
    """Collective: every rank's outcome of a step it did alone, (kind, message) or None; the
    same answer on every rank: the first "incompatible" failure, else the first failure by
    rank, else None."""
    outcomes = [failure]
    if dist.is_available() and dist.is_initialized():
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, failure)
    failed = [o for o in outcomes if o]
    incompatible = [o for o in failed if o[0] == "incompatible"]
    return (incompatible or failed or [None])[0]


def _raise_agreed(failure: tuple[str, str] | None) -> None:
    if failure is None:
        return
    kind, message = failure
    raise (IncompatibleCheckpoint if kind == "incompatible" else CheckpointError)(message)


def write_failure(e: BaseException, where: Path) -> str:
    """One line for a failed write: the OS error and its file when there is one. safetensors
    reports it inside a SafetensorError ("os error 28"); torch's zip writer reports a short
    write to a path only as "unexpected pos A vs B" (the free space tells a full disk), to a
    Python file as a RuntimeError whose context is the file's OSError."""
    from torch.distributed.checkpoint.api import CheckpointException

    cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
    if isinstance(cause, CheckpointError):  # a backend's own, naming its file already
        return str(cause)
    if not isinstance(cause, OSError) and isinstance(cause.__context__, OSError):
        cause = cause.__context__  # torch's zip writer writing to a Python file
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror} writing {cause.filename or where}"
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    errno = re.search(r"os error (\d+)", lines[-1])  # safetensors' wording
    if errno:
        return f"{os.strerror(int(errno.group(1)))} writing {where}"
    try:
        full = shutil.disk_usage(where if where.exists() else where.parent).free < 1 << 20
    except OSError:
        full = False
    if full:
        return f"No space left on device writing {where} ({lines[-1][:200]})"
    return f"cannot write {where} ({lines[-1][:200]})"


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int = 3):
        if keep < 1:  # 0 would delete the checkpoint just written (the config refuses it too)
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
        self.dir = run_dir / "checkpoints"
        self.keep = keep

    # -- saving -----------------------------------------------------------------------------

    def save(self, step: int, gan, trainer_state: dict, loader_state: dict) -> Path:
        """Collective: every rank calls it at the same step boundary. Raises CheckpointError
        on every rank when any rank fails to write (the partial `.tmp` is removed)."""
        rank, world = _rank_world()
        final = self.dir / f"step_{step:06d}"
        tmp = self.dir / f"step_{step:06d}.tmp"
        failure = None
        if rank == 0:
            failure = self._attempt(lambda: self._prepare(tmp), tmp)
        self._agreed_or_discard(failure, tmp)
        failure = self._attempt(
            lambda: self._write_rank(gan, tmp, trainer_state, loader_state), tmp)
        self._agreed_or_discard(failure, tmp)
        if rank == 0:
            failure = self._attempt(lambda: self._publish(tmp, final, world), final)
        self._agreed_or_discard(failure, tmp)  # e.g. COMPLETE not written: tmp goes too
        if rank == 0:
            self._prune(final)
        log.info("saved checkpoint %s", final)
        return final

    @staticmethod
    def _attempt(write, where: Path) -> tuple[str, str] | None:
        """Run one rank's writes; a failure becomes (kind, one line naming the file)."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            write()
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            log.error("checkpoint write failed: %s", e)
            return "damaged", f"checkpoint not saved: {write_failure(e, where)}"
        return None

    def _agreed_or_discard(self, failure, tmp: Path) -> None:
        """Collective: when any rank failed, rank 0 removes `tmp` if it is still there
        (nobody writes into it any more) and every rank raises the same CheckpointError."""
        failure = _agree(failure)
        if failure is None:
            return
        if _rank_world()[0] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_agreed(failure)

    @staticmethod
    def _prepare(tmp: Path) -> None:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash: never trusted, never reused
        tmp.mkdir(parents=True)

    @staticmethod
    def _write_rank(gan, tmp: Path, trainer_state: dict, loader_state: dict) -> None:
        """This rank's part: the backend's state (collective inside DCP), its RNG and DALI
        state, its loader position, trainer.json on rank 0; each file fsynced."""
        rank, world = _rank_world()
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
        for f in written + [f for f in tmp.iterdir() if f.name.startswith(f"rank{rank}.")]:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    def _publish(self, tmp: Path, final: Path, world: int) -> None:
        """Rank 0, once every rank's files are on disk: COMPLETE, rename, then `latest`."""
        write_text_atomic(tmp / COMPLETE, f"{world}\n")
        if final.exists():  # an older save of the same step (e.g. rerun): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        write_text_atomic(self.dir / "latest", final.name + "\n")

    def _prune(self, final: Path) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: max(0, len(complete) - self.keep)]:
            if old != final:  # e.g. a run resumed from an older explicit checkpoint
                try:
                    shutil.rmtree(old)
                except OSError as e:  # the new checkpoint is saved: not a reason to stop
                    log.warning("could not remove old checkpoint %s: %s", old, e)

    # -- finding ----------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
        return sorted((p for p in found if (p / COMPLETE).exists()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; the newest complete one, with a warning, when that
        file is unreadable or names no checkpoint directory of this run."""
        complete = self.complete_checkpoints()
        pointer = self.dir / "latest"
        if pointer.exists() or pointer.is_symlink():
            try:
                name = pointer.read_bytes().decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                name, why = None, f"unreadable ({e})"
            else:
                why = f"names {name[:80]!r}, not a checkpoint directory of {self.dir}"
            if name is not None and STEP_DIR.match(name) and (self.dir / name).is_dir():
                return self.dir / name
            log.warning("%s: %s; using the newest complete checkpoint", pointer, why)
        return complete[-1] if complete else None

    def _candidates(self) -> list[Path]:
        """Collective: `latest`, then the other complete checkpoints newest first, as rank 0
        sees them (every rank then tries the same list in the same order)."""
        latest = self.latest()
        names = [] if latest is None else [latest.name] + [
            p.name for p in reversed(self.complete_checkpoints()) if p != latest]
        if dist.is_available() and dist.is_initialized():
            shared = [names]
            dist.broadcast_object_list(shared, src=0)
            names = shared[0]
        return [self.dir / n for n in names]

    # -- loading ----------------------------------------------------------------------------

    def _check(self, path: Path, model_cfg, backend) -> dict:
        """Structural checks before any tensor is read; returns trainer.json."""
        if not (path / COMPLETE).exists():
            raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker)")
        if path.parent == self.dir and path.is_symlink():
            raise CheckpointError(
                f"{path}: a symbolic link to {os.readlink(path)}; a run's checkpoints are "
                f"folders of its own: to resume from that one, pass resume_from={path.resolve()}")
        _own_files(path)
        state_file = path / "trainer.json"
        state = _read_json(state_file)
        if not isinstance(state.get("world_size"), int) or state["world_size"] < 1:
            raise CheckpointError(f"{state_file}: no world_size (a positive integer)")
        saved = state.get("model")
        current = OmegaConf.to_container(OmegaConf.structured(model_cfg), enum_to_str=True)
        if isinstance(saved, dict) and saved.get("mode") == "lineart" and "memory" not in saved:
            raise IncompatibleCheckpoint(
                f"{state_file}: a line-art run saved before the colour-memory generator (issue "
                "16): its weights do not fit this version's line-art G; start over with "
                "--no-resume or a new name, or resume with that version")
        if isinstance(saved, dict):
            # A setting added after this checkpoint was written takes its default, which is
            # what the code did before the setting existed; settings that only choose the
            # initial weights do not matter to a resume, which loads the saved ones.
            defaults = OmegaConf.to_container(OmegaConf.structured(ModelConfig),
                                              enum_to_str=True)
            saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
            for key in INIT_ONLY:
                saved.pop(key, None)
                current.pop(key, None)
        if saved != current:
            saved = saved if isinstance(saved, dict) else {}
            diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
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

    def _read_local(self, path: Path, model_cfg, backend):
        """Everything this rank reads alone, before any collective: (trainer state, this
        rank's loader position, its RNG and DALI tensors or None at another world size)."""
        state = self._check(path, model_cfg, backend)
        rank, world = _rank_world()
        if state["world_size"] != world:
            position = _read_position(path / "rank0.json")
            position["source"] = None
            return state, position, None
        position = _read_position(path / f"rank{rank}.json")
        tensor_file = path / f"rank{rank}.safetensors"
        try:
            tensors = load_file(str(tensor_file))
        except Exception as e:  # SafetensorError, OSError: truncated or not safetensors
            raise CheckpointError(f"{tensor_file}: unreadable ({e})") from None
        if "rng_cpu" not in tensors:
            raise CheckpointError(f"{tensor_file}: no rng_cpu tensor")
        dali = tensors.get("dali")
        if dali is not None and (dali.dtype != torch.uint8 or dali.dim() != 1):
            raise CheckpointError(f"{tensor_file}: 'dali' is not a 1-D uint8 tensor "
                                  f"({dali.dtype}, shape {list(dali.shape)})")
        position["source"] = bytes(dali.numpy()) if dali is not None else None
        return state, position, tensors

    def load(self, path: Path, gan, model_cfg) -> tuple[dict, dict | None, dict | None]:
        """Collective. Load `path` into `gan`; return (trainer state, this rank's loader
        position, its DALI bytes and RNG or None when the world size changed). Raises the
        same CheckpointError on every rank when any rank cannot use `path`."""
        try:
            result, failure = self._read_local(path, model_cfg, gan.backend), None
        except IncompatibleCheckpoint as e:
            result, failure = None, ("incompatible", str(e))
        except CheckpointError as e:
            result, failure = None, ("damaged", str(e))
        _raise_agreed(_agree(failure))
        state = result[0]
        failure = None
        try:
            gan.backend.load_state(gan, path)  # collective (DCP or DeepSpeed)
        except CheckpointError as e:
            failure = ("damaged", str(e))
        _raise_agreed(_agree(failure))
        rank, world = _rank_world()
        if state["world_size"] != world:
            log.warning("%s was saved on %d ranks, resuming on %d: model and optimizer state "
                        "are resharded; the data epoch restarts", path, state["world_size"],
                        world)
        return result

    def restore(self, gan, model_cfg, explicit: Path | None = None):
        """Collective. Resume from `explicit`, else from `latest`, falling back (with a
        warning, on every rank together) to the previous complete checkpoints when `latest`
        is damaged. None when there is none."""
        if explicit is not None:
            return explicit, self.load(explicit, gan, model_cfg)
        candidates = self._candidates()
        if not candidates:
            return None
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


def _own_files(path: Path) -> None:
    """Refuses (CheckpointError naming the entry) anything under the checkpoint folder `path`
    but regular files and folders: a symlink would make the checkpoint read a file outside
    its folder, a FIFO blocks the reader forever."""
    def unlistable(e: OSError):
        raise CheckpointError(f"{e.filename}: unreadable ({e.strerror})")

    for root, dirs, files in os.walk(path, onerror=unlistable):  # does not follow links
        for name in dirs + files:
            entry = Path(root) / name
            try:
                mode = entry.lstat().st_mode
                target = os.readlink(entry) if stat.S_ISLNK(mode) else None
            except OSError as e:  # removed meanwhile
                raise CheckpointError(f"{entry}: unreadable ({e.strerror})") from None
            if target is not None:
                raise CheckpointError(
                    f"{entry}: a symbolic link to {target}; a checkpoint is read only from "
                    f"files inside its folder {path}: put the file itself there, or resume "
                    "from another checkpoint")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise CheckpointError(
                    f"{entry}: not a regular file (a FIFO, socket or device); a checkpoint holds "
                    "only the files it was saved with: remove it, or resume from another "
                    "checkpoint")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def _read_position(path: Path) -> dict:
    """A rank's loader position, checked here (before the ranks agree) for what
    TripletLoader.load_state_dict reads unconditionally: a rank that failed there alone,
    after the agreement, would leave the others in the next collective."""
    position = _read_json(path)
    for key in ("epoch", "step"):
        value = position.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{path}: no {key!r} (a non-negative integer)")
    return position
