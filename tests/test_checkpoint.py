"""Checkpoints with real processes: exact resume after SIGTERM and SIGKILL, kills during a
save, resharding 2 -> 1 ranks, and damaged checkpoints."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from launching import TINY, launch, popen
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer.checkpoint import Checkpointer, CheckpointError, IncompatibleCheckpoint
from trainer.config import load_config
from trainer.train import build_gan

STEPS = 40


def train_args(shards: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["trainer/main.py", "--config", "configs/demo.yaml", f"data.shards={shards}",
            f"runs_dir={runs}", f"name={name}", *TINY, f"train.max_steps={STEPS}",
            "train.log_every=1", "train.val_every=0", "train.image_every=0",
            "train.checkpoint_every=10", *extra]


def workers(launcher: subprocess.Popen) -> list[int]:
    """PIDs of the trainer ranks started by an `accelerate launch` process."""
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                              text=True).stdout.split()
    return [int(p) for p in children
            if b"trainer/main.py" in Path(f"/proc/{p}/cmdline").read_bytes()]


def wait_for(path: Path, proc: subprocess.Popen, timeout=120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def final_state(run: Path) -> dict:
    """The last checkpoint of a run as plain tensors (DCP -> torch.save, then loaded)."""
    ckpt = Checkpointer(run).latest()
    out = run.parent / f"{run.name}-final.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)


def assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def losses(run: Path, tag: str = "Loss/G/total") -> dict[int, float]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()  # a restart's events replace those logged after the resumed step
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps on 2 ranks."""
    runs = tmp_path_factory.mktemp("ref")
    result = launch(*train_args(shards, runs, "ref"))
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "ref"


@pytest.mark.parametrize("kill", ["SIGTERM", "SIGKILL"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(shards, reference, tmp_path, kill):
    args = train_args(shards, tmp_path, "cut")
    proc = popen(*args)
    wait_for(tmp_path / "cut" / "checkpoints" / "step_000010", proc)
    victim = workers(proc)[1]  # one rank only: the ranks must agree (or fail) together
    os.kill(victim, getattr(signal, kill))
    output, _ = proc.communicate(timeout=300)
    if kill == "SIGTERM":
        assert proc.returncode == 0, output[-3000:]
        assert not (tmp_path / "cut" / "COMPLETE").exists()
    else:
        assert proc.returncode != 0
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    step = int(resumed.stdout.split("resumed from", 1)[1].split("at step")[1].split()[0])
    assert 10 <= step < STEPS
    assert (tmp_path / "cut" / "COMPLETE").exists()
    assert_same(final_state(tmp_path / "cut"), final_state(reference))
    ref_losses, cut_losses = losses(reference), losses(tmp_path / "cut")
    assert sorted(cut_losses) == list(range(1, STEPS + 1))
    assert all(cut_losses[s] == ref_losses[s] for s in range(step + 1, STEPS + 1))


def test_a_killed_run_with_memory_sampling_and_the_temporal_loss_resumes_bitwise(shards,
                                                                                tmp_path):
    """Scheduled sampling draws per-sample choices from the global RNG and runs an extra G
    pass, the temporal loss reads the stored flow: all must continue exactly where the killed
    run stopped (issues 16 and 17)."""
    memory = ["model.memory=true", "model.p_drop=0.25", "model.scheduled_sampling=0.5",
              "loss.lambda_temporal=10"]
    ref = launch(*train_args(shards, tmp_path, "memory_ref", *memory))
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = train_args(shards, tmp_path, "memory_cut", *memory)
    proc = popen(*args)
    wait_for(tmp_path / "memory_cut" / "checkpoints" / "step_000020", proc)
    os.kill(workers(proc)[0], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same(final_state(tmp_path / "memory_cut"), final_state(tmp_path / "memory_ref"))
    ref_losses, cut_losses = losses(tmp_path / "memory_ref"), losses(tmp_path / "memory_cut")
    assert cut_losses == ref_losses
    temporal = losses(tmp_path / "memory_ref", "Loss/G/temporal")
    # step 1: G starts at grey, its colours of t and t-1 are equal (0); then it learns
    assert len(temporal) == STEPS and all(v > 0 for s, v in temporal.items() if s > 1)


def test_a_kill_during_a_save_resumes_from_the_previous_complete_checkpoint(shards, reference,
                                                                           tmp_path):
    args = train_args(shards, tmp_path, "saves", "train.checkpoint_every=1")
    for round_ in range(3):  # saves every step: a kill lands in or near a save each time
        proc = popen(*args)
        wait_for(tmp_path / "saves" / "checkpoints" / f"step_{6 * (round_ + 1):06d}", proc)
        for pid in [*workers(proc), proc.pid]:  # the ranks run in sessions of their own
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        ckpts = Checkpointer(tmp_path / "saves")
        complete = ckpts.complete_checkpoints()
        assert complete and all((p / "COMPLETE").exists() for p in complete)
    result = launch(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {complete[-1]}" in result.stdout  # the newest complete one
    assert_same(final_state(tmp_path / "saves"), final_state(reference))


def test_saved_on_two_ranks_resumed_on_one(shards, reference, tmp_path):
    run = tmp_path / "reshard"
    shutil.copytree(reference, run)
    saved = Checkpointer(run).complete_checkpoints()[-2]  # step 30
    expected = run.parent / "expected.pt"
    dcp_to_torch_save(str(saved), str(expected))
    expected = torch.load(expected, weights_only=False)

    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", *TINY])
    gan = build_gan(cfg, Accelerator(cpu=True))
    state, position, tensors = Checkpointer(run).load(saved, gan, cfg.model)
    assert state["step"] == 30 and tensors is None  # another world size: no per-rank state
    assert_same({k: v for k, v in gan.G.state_dict().items()}, expected["G"])
    moments = gan.opt_G.state_dict()["state"]
    saved_moments = expected["opt_G"]["state"]
    assert len(moments) == len(saved_moments)
    for name, value in saved_moments.items():  # FQN-keyed in the checkpoint
        index = list(dict(gan.G.named_parameters())).index(name)
        assert torch.equal(moments[index]["exp_avg"], value["exp_avg"])
        assert torch.equal(moments[index]["exp_avg_sq"], value["exp_avg_sq"])

    result = launch(*train_args(shards, tmp_path, "reshard", f"resume_from={saved}",
                                "train.max_steps=36"), processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 30" in result.stdout
    assert "the data epoch restarts" in result.stderr or "restarting epoch" in result.stderr


def damaged_copy(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "damaged"
    shutil.copytree(reference, run)
    return run


def test_damaged_latest_falls_back_and_an_explicit_one_is_an_error(shards, reference, tmp_path,
                                                                   caplog):
    run = damaged_copy(reference, tmp_path)
    ckpts = Checkpointer(run)
    latest = ckpts.latest()
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated shard
    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", *TINY])
    gan = build_gan(cfg, Accelerator(cpu=True))
    path, (state, _, _) = ckpts.restore(gan, cfg.model)
    assert path == ckpts.complete_checkpoints()[-2] and state["step"] == 30
    assert f"cannot resume from {latest}" in caplog.text
    with pytest.raises(CheckpointError, match=str(latest)):
        ckpts.restore(gan, cfg.model, explicit=latest)

    (ckpts.complete_checkpoints()[-2] / "rank1.safetensors").unlink()  # missing rank file
    with pytest.raises(CheckpointError, match="rank1.safetensors: missing"):
        ckpts.load(ckpts.complete_checkpoints()[-2], gan, cfg.model)

    tmp = run / "checkpoints" / "step_000099.tmp"  # a crashed save is never a candidate
    tmp.mkdir()
    assert tmp not in ckpts.complete_checkpoints()


def test_resuming_with_another_model_config_is_a_clear_error(shards, reference, tmp_path):
    run = damaged_copy(reference, tmp_path)
    result = launch(*train_args(shards, tmp_path, "damaged", "model.ngf=16",
                                "train.max_steps=50"))
    assert result.returncode != 0
    assert "trainer.json: saved with another model config" in result.stderr
    assert "ngf" in result.stderr
    assert run.exists()


# -- in-process checks: crafted checkpoints, damaged files, failed saves, rank agreement ------

class RunsCode:
    """Pickles to a call of os.system: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_gan(accelerator=None):
    cfg = load_config("configs/demo.yaml", ["data.shards=unused", *TINY])
    gan = build_gan(cfg, accelerator or Accelerator(cpu=True))
    loss = sum(p.sum() for m in (gan.G, gan.D) for p in m.parameters())
    loss.backward()  # one step: Adam moments and step counts exist
    gan.opt_G.step(), gan.opt_D.step()
    return cfg, gan


def save_tiny(ckpts: Checkpointer, step: int, gan, cfg, source: bytes = b"dali") -> Path:
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.structured(cfg.model), enum_to_str=True)
    return ckpts.save(step, gan, {"step": step, "model": model},
                      {"epoch": 0, "step": step, "source": source})


@pytest.fixture
def two_checkpoints(tmp_path, one_thread):
    cfg, gan = tiny_gan()
    ckpts = Checkpointer(tmp_path / "run")
    save_tiny(ckpts, 1, gan, cfg)
    save_tiny(ckpts, 2, gan, cfg)
    return cfg, gan, ckpts


def test_a_crafted_checkpoint_runs_no_code_and_is_refused_by_name(two_checkpoints, tmp_path,
                                                                  caplog):
    import pickle

    cfg, gan, ckpts = two_checkpoints
    first, second = ckpts.complete_checkpoints()
    fresh = tiny_gan()[1]  # other random weights
    state, position, _ = ckpts.load(second, fresh, cfg.model)  # the safe path loads bitwise
    assert state["step"] == 2 and position["source"] == b"dali"
    for a, b in ((gan.G, fresh.G), (gan.D, fresh.D), (gan.opt_G, fresh.opt_G),
                 (gan.opt_D, fresh.opt_D), (gan.ema, fresh.ema)):
        assert_same(a.state_dict(), b.state_dict())

    marker = tmp_path / "code-ran"
    metadata_file = second / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # our own: trusted here
    original = metadata_file.read_bytes()

    # 1. code in .metadata, which DCP itself would pickle.load
    metadata.planner_data["G.x"] = RunsCode(marker)
    crafted = pickle.dumps(metadata)
    pickle.loads(crafted)  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    metadata_file.write_bytes(crafted)
    with pytest.raises(CheckpointError, match=rf"{metadata_file}: refused .*posix\.system"):
        ckpts.load(second, fresh, cfg.model)
    path, (state, _, _) = ckpts.restore(fresh, cfg.model)  # latest refused: falls back
    assert path == first and state["step"] == 1
    assert f"cannot resume from {second}" in caplog.text
    assert not marker.exists()

    # 2. code in a non-tensor entry (optimizer param_groups are torch.save'd bytes, which
    # DCP's planner reads with torch.load(weights_only=False))
    metadata = pickle.loads(original)
    key = next(k for k in metadata.storage_data if k.fqn == "opt_G.param_groups.0.lr")
    info = metadata.storage_data[key]
    payload = io.BytesIO()
    torch.save(RunsCode(marker), payload)
    torch.load(io.BytesIO(payload.getvalue()), weights_only=False)  # the payload is real
    assert marker.exists()
    marker.unlink()
    shard = second / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(payload.getvalue())
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError,
                       match=rf"{shard}: entry 'opt_G.param_groups.0.lr' refused .*posix.system"):
        ckpts.load(second, fresh, cfg.model)
    assert not marker.exists()

    # 3. metadata pointing outside the checkpoint directory
    info.relative_path = "../step_000001/" + info.relative_path
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="not a plain file of the checkpoint directory"):
        ckpts.load(second, fresh, cfg.model)


@pytest.mark.parametrize("pointer", [b"\xff\xfe\n", b"garbage\n", b"step_000099\n",
                                     b"../../etc\n", b"step_000001/../../x\n"])
def test_an_unreadable_latest_falls_back_to_the_newest_complete(tmp_path, caplog, pointer):
    ckpts = Checkpointer(tmp_path / "run")
    for step in (1, 2):
        (ckpts.dir / f"step_{step:06d}").mkdir(parents=True)
        (ckpts.dir / f"step_{step:06d}" / "COMPLETE").write_text("2\n")
    (ckpts.dir / "latest").write_bytes(pointer)
    assert ckpts.latest() == ckpts.dir / "step_000002"
    assert f"{ckpts.dir / 'latest'}: " in caplog.text


def test_damaged_rank_files_are_named_errors(two_checkpoints):
    cfg, gan, ckpts = two_checkpoints
    first, second = ckpts.complete_checkpoints()
    position = second / "rank0.json"
    position.write_bytes(position.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=f"{position}: unreadable"):
        ckpts.load(second, gan, cfg.model)
    (first / "rank0.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="no usable checkpoint: .*rank0.json: unreadable"):
        ckpts.restore(gan, cfg.model)
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(ckpts.dir.parent, keep=0)


def test_rank_files_missing_what_the_loader_reads_are_refused_before_agreeing(two_checkpoints):
    """A rank file that reads as JSON but lacks the position (or holds a DALI state that is
    not bytes) is a CheckpointError of `load`, which the ranks agree on; the loader itself
    would raise a KeyError on that rank alone, after the agreement."""
    from safetensors.torch import load_file, save_file

    cfg, gan, ckpts = two_checkpoints
    first, second = ckpts.complete_checkpoints()
    position = second / "rank0.json"
    saved = position.read_bytes()
    for text, key in ((b"{}", "epoch"), (b'{"epoch": 0, "step": "3"}', "step"),
                      (b'{"epoch": -1, "step": 0}', "epoch")):
        position.write_bytes(text)
        with pytest.raises(CheckpointError, match=rf"{position}: no '{key}'"):
            ckpts.load(second, gan, cfg.model)
    position.write_bytes(saved)
    tensor_file = second / "rank0.safetensors"
    tensors = load_file(str(tensor_file))
    save_file({**tensors, "dali": torch.zeros(3)}, str(tensor_file))
    with pytest.raises(CheckpointError, match=rf"{tensor_file}: 'dali' is not a 1-D uint8"):
        ckpts.load(second, gan, cfg.model)
    path, (state, _, _) = ckpts.restore(gan, cfg.model)  # falls back to the previous one
    assert path == first and state["step"] == 1


def test_a_failed_publish_removes_its_tmp(two_checkpoints):
    """Rank 0's last step fails (here: a file, not a checkpoint, has the final name, and
    replacing it fails): no `step_N.tmp` is left, the error names it, the file stays."""
    cfg, gan, ckpts = two_checkpoints
    squatter = ckpts.dir / "step_000003"
    squatter.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=rf"checkpoint not saved: .*{squatter}"):
        save_tiny(ckpts, 3, gan, cfg)
    assert sorted(p.name for p in ckpts.dir.iterdir()) == ["latest", "step_000001",
                                                          "step_000002", "step_000003"]
    assert squatter.read_text() == "not a checkpoint\n"
    assert ckpts.latest() == ckpts.dir / "step_000002"


def test_a_failed_save_removes_its_tmp_and_names_the_cause(two_checkpoints):
    """A real write failure: RLIMIT_FSIZE makes every write past 20 kB fail (EFBIG)."""
    import resource

    cfg, gan, ckpts = two_checkpoints
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(CheckpointError,
                           match=rf"checkpoint not saved: File too large writing "
                                 rf"{ckpts.dir}/step_000003.tmp"):
            save_tiny(ckpts, 3, gan, cfg)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in ckpts.dir.iterdir()) == ["latest", "step_000001",
                                                          "step_000002"]
    assert ckpts.latest() == ckpts.dir / "step_000002"
    assert save_tiny(ckpts, 3, gan, cfg) == ckpts.dir / "step_000003"  # space again: saves


FULL_DISK = """
import sys
from pathlib import Path
from test_checkpoint import Checkpointer, CheckpointError, save_tiny, tiny_gan
cfg, gan = tiny_gan()
ckpts = Checkpointer(Path(sys.argv[1]))
try:
    for step in range(1, 10):
        save_tiny(ckpts, step, gan, cfg)
except CheckpointError as e:
    print("ERROR", e)
print("LEFT", sorted(p.name for p in ckpts.dir.iterdir()))
"""


@pytest.mark.slow
def test_a_full_disk_during_a_save_says_so(tmp_path):
    """A real full disk: a 2 MB tmpfs in a private mount namespace (skipped where user
    namespaces are not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=2m tmpfs {mnt} && cd {Path(__file__).parent.parent} && "
              f"PYTHONPATH=tests {sys.executable} -c \"$SCRIPT\" {mnt}/run")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                             script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SCRIPT": FULL_DISK, "OMP_NUM_THREADS": "1"})
    if "ERROR" not in result.stdout and ("unshare" in result.stderr
                                         or "mount" in result.stderr):
        pytest.skip(f"no private tmpfs here: {result.stderr.strip()[-200:]}")
    assert "ERROR checkpoint not saved: No space left on device writing" in result.stdout, \
        result.stdout + result.stderr[-3000:]
    left = result.stdout.split("LEFT", 1)[1]
    assert ".tmp" not in left and "step_000001" in left


def agreement_rank(rank: int, world: int, port: int, root: Path) -> None:
    """One of 2 gloo ranks (torch.multiprocessing): a save failing on rank 1 only, then a
    checkpoint damaged for rank 1 only. Writes what this rank saw to root/rank<r>.json."""
    import json
    import resource

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    cfg, gan = tiny_gan()
    ckpts = Checkpointer(root / "run")
    seen = {}
    big = bytes(3_000_000)  # rank 1's DALI state: over its file size limit below
    save_tiny(ckpts, 1, gan, cfg, big)
    save_tiny(ckpts, 2, gan, cfg, big)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:  # its DCP shard (~0.6 MB) fits, its rank1.safetensors does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, hard))
    try:
        save_tiny(ckpts, 3, gan, cfg, big)
        seen["save"] = "saved"
    except CheckpointError as e:
        seen["save"] = str(e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    dist.barrier()
    if rank == 0:  # damage for rank 1 only, and a latest that is not UTF-8
        damaged = ckpts.dir / "step_000002" / "rank1.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:1000])
        (ckpts.dir / "latest").write_bytes(b"\xff\xfe")
        seen["tmp_left"] = sorted(p.name for p in ckpts.dir.glob("*.tmp"))
    dist.barrier()
    path, (state, position, _) = ckpts.restore(gan, cfg.model)
    seen["resumed"] = [path.name, state["step"], position["step"]]
    try:
        ckpts.load(ckpts.dir / "step_000002", gan, cfg.model)
        seen["explicit"] = "loaded"
    except CheckpointError as e:
        seen["explicit"] = str(e)
    (root / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()  # neither rank tears gloo down while the other still talks (SIGABRT)
    dist.destroy_process_group()


def two_ranks_report(rank_fn, tmp_path: Path) -> list[dict]:
    """Run `rank_fn(rank, world, port, tmp_path)` on 2 spawned gloo ranks and return what each
    wrote to rank<r>.json; fails (killing them) if they hang: a split decision leaves one rank
    waiting in a collective."""
    import json

    import torch.multiprocessing as mp
    from launching import free_port

    context = mp.start_processes(rank_fn, args=(2, free_port(), tmp_path), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.time() + 180
    while not context.join(timeout=5):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the ranks hung")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_agree_on_a_failed_save_and_a_checkpoint_damaged_for_one_rank(tmp_path):
    seen = two_ranks_report(agreement_rank, tmp_path)
    assert seen[0]["save"] == seen[1]["save"]
    assert seen[0]["save"].startswith("checkpoint not saved: File too large writing")
    assert "step_000003.tmp" in seen[0]["save"] and seen[0]["tmp_left"] == []
    assert seen[0]["resumed"] == seen[1]["resumed"] == ["step_000001", 1, 1]
    assert seen[0]["explicit"] == seen[1]["explicit"]
    assert "step_000002/rank1.safetensors: unreadable" in seen[0]["explicit"]


@pytest.mark.parametrize("entry", ["shard-link", "json-link", "fifo", "step-link"])
def test_a_checkpoint_reads_only_files_inside_its_folder(two_checkpoints, tmp_path, caplog,
                                                         entry):
    """A symlink under the checkpoint folder (even to an identical copy, which would load), a
    FIFO (reading it would block forever), or a step folder of the run that is a symlink: the
    checkpoint is refused naming the entry, `latest` falls back, nothing is changed."""
    cfg, gan, ckpts = two_checkpoints
    first, second = ckpts.complete_checkpoints()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if entry == "step-link":
        victim, target = second, outside / second.name
        shutil.move(second, target)
        second.symlink_to(target)
        expected = rf"{second}: a symbolic link to {target}; .* pass resume_from={target}$"
    elif entry == "fifo":
        victim = second / "rank0.json"
        victim.unlink()
        os.mkfifo(victim)
        expected = rf"{victim}: not a regular file \(a FIFO, socket or device\)"
    else:
        victim = next(second.glob("*.distcp")) if entry == "shard-link" else second / "trainer.json"
        target = outside / victim.name
        shutil.move(victim, target)
        victim.symlink_to(target)
        expected = rf"{victim}: a symbolic link to {target}; a checkpoint is read only from " \
                   rf"files inside its folder {second}"
    before = sorted((p, p.lstat().st_mode) for p in ckpts.dir.rglob("*"))
    with pytest.raises(CheckpointError, match=expected):
        ckpts.load(second, gan, cfg.model)
    path, (state, _, _) = ckpts.restore(gan, cfg.model)
    assert path == first and state["step"] == 1
    assert f"cannot resume from {second}: {victim}: " in caplog.text
    assert sorted((p, p.lstat().st_mode) for p in ckpts.dir.rglob("*")) == before


def confinement_rank(rank: int, world: int, port: int, root: Path) -> None:
    """One of 2 gloo ranks: the newest checkpoint's rank-1 shard becomes a symlink to an
    identical copy outside the checkpoint (it would load). Writes what this rank saw."""
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    cfg, gan = tiny_gan()
    ckpts = Checkpointer(root / "run")
    save_tiny(ckpts, 1, gan, cfg)
    second = save_tiny(ckpts, 2, gan, cfg)
    if rank == 0:
        shard = second / "__1_0.distcp"
        (root / "elsewhere").mkdir()
        shutil.move(shard, root / "elsewhere" / shard.name)
        shard.symlink_to(root / "elsewhere" / shard.name)
    dist.barrier()
    seen = {}
    path, (state, _, _) = ckpts.restore(gan, cfg.model)
    seen["resumed"] = [path.name, state["step"]]
    try:
        ckpts.load(second, gan, cfg.model)
        seen["explicit"] = "loaded"
    except CheckpointError as e:
        seen["explicit"] = str(e)
    (root / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_refuse_a_shard_outside_the_checkpoint_together(tmp_path):
    seen = two_ranks_report(confinement_rank, tmp_path)
    assert seen[0] == seen[1]
    assert seen[0]["resumed"] == ["step_000001", 1]
    shard = tmp_path / "run" / "checkpoints" / "step_000002" / "__1_0.distcp"
    assert seen[0]["explicit"].startswith(
        f"{shard}: a symbolic link to {tmp_path / 'elsewhere' / '__1_0.distcp'}; ")


def test_deepspeed_files_load_weights_only(tmp_path):
    """DeepSpeed's own loader unpickles anything; the backend's stand-in admits tensors,
    plain values and the DeepSpeed classes of a ZeRO checkpoint only."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from trainer.backends.deepspeed import deepspeed_weights_only_load

    legit = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1), "zero_stage": ZeroStageEnum.gradients,
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                "state": torch.arange(4.0)}, legit)
    loaded = deepspeed_weights_only_load(str(legit), map_location="cpu")
    assert loaded["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["loss_scaler"].cur_scale == 1
    assert torch.equal(loaded["state"], torch.arange(4.0))

    marker, crafted = tmp_path / "code-ran", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCode(marker)}, crafted)
    with pytest.raises(CheckpointError, match=rf"{crafted}: refused .*posix.system"):
        deepspeed_weights_only_load(str(crafted))
    assert not marker.exists()


def test_a_setting_added_after_the_save_takes_its_default(two_checkpoints):
    """A checkpoint written before a model setting existed resumes when the run keeps that
    setting's default, and is refused when it does not; a setting that only chooses the
    initial weights never blocks a resume."""
    import json

    from omegaconf import OmegaConf

    cfg, gan, ckpts = two_checkpoints
    state_file = ckpts.dir / "step_000002" / "trainer.json"
    state = json.loads(state_file.read_text())
    del state["model"]["zero_init_head"], state["model"]["d_temporal"]  # as saved before them
    state_file.write_text(json.dumps(state))
    assert ckpts.load(ckpts.dir / "step_000002", gan, cfg.model)[0]["step"] == 2
    init_only = OmegaConf.merge(cfg.model, {"zero_init_head": not cfg.model.zero_init_head})
    assert ckpts.load(ckpts.dir / "step_000002", gan, init_only)[0]["step"] == 2
    changed = OmegaConf.merge(cfg.model, {"d_temporal": True})  # not the default
    with pytest.raises(IncompatibleCheckpoint, match="d_temporal"):
        ckpts.load(ckpts.dir / "step_000002", gan, changed)


def test_a_line_art_checkpoint_from_before_the_memory_generator_is_refused(two_checkpoints):
    """A line-art run saved before colour memory (its model config has no `memory`) holds weights
    of another line-art G: refused as incompatible, saying why, not taken for damage."""
    import json

    cfg, gan, ckpts = two_checkpoints
    latest = ckpts.complete_checkpoints()[-1]
    state_file = latest / "trainer.json"
    state = json.loads(state_file.read_text())
    state["model"]["mode"] = "lineart"
    del state["model"]["memory"]
    state_file.write_text(json.dumps(state))
    lineart = OmegaConf.merge(cfg.model, {"mode": "lineart"})
    with pytest.raises(IncompatibleCheckpoint, match="before the colour-memory generator"):
        ckpts.load(latest, gan, lineart)


def fp16_gan(cfg):
    """The tiny GAN with the DDP backend driving a GradScaler (fp16 autocast needs a GPU; the
    scaler's arithmetic and the fused Adam under it are the same on the CPU)."""
    accelerator = Accelerator(cpu=True)
    # before `prepare`, as Accelerate sets it up for fp16 on a GPU: an AcceleratedOptimizer
    # built there would carry it
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    return build_gan(cfg, accelerator)


def test_an_fp16_run_resumes_as_if_uninterrupted(tmp_path, one_thread):
    """The fp16 resume path of the DDP backend: raw fused Adam and a GradScaler, stepped by
    the backend; the optimizers saved and loaded through DCP's state-dict helpers (which, on a
    fresh process, create the empty Adam state with `step()`, which through Accelerate's fp16
    wrapper would go into GradScaler.step and assert), the scaler through the trainer state.
    The resumed step equals the uninterrupted one."""
    from test_gpu_paths import batch

    from trainer.step import train_step

    cfg = load_config("configs/demo.yaml", ["data.shards=unused", *TINY])
    torch.manual_seed(0)
    gan = fp16_gan(cfg)
    for i in range(2):
        torch.manual_seed(100 + i)
        train_step(gan.backend.accelerator, gan, batch(seed=i), step=i)
    gan.backend.save_state(gan, tmp_path)
    trainer_state = gan.backend.trainer_state()
    assert trainer_state["scaler"]["scale"] == 2.0 ** 12  # grew once per step

    torch.manual_seed(1)  # other initial weights: all of them must come from the checkpoint
    fresh = fp16_gan(cfg)
    fresh.backend.load_trainer_state(trainer_state)
    fresh.backend.load_state(fresh, tmp_path)
    outs = []
    for run in (gan, fresh):
        torch.manual_seed(102)
        outs.append(train_step(run.backend.accelerator, run, batch(seed=2), step=2))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
    assert outs[1]["Skipped/fp16_overflow"].item() == 0.0
    for a, b in ((gan.G, fresh.G), (gan.D, fresh.D), (gan.ema.model, fresh.ema.model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    for saved, loaded in ((gan.opt_G, fresh.opt_G), (gan.opt_D, fresh.opt_D)):
        saved, loaded = saved.state_dict()["state"], loaded.state_dict()["state"]
        assert saved.keys() == loaded.keys() and saved
        for index, state in saved.items():
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state[key], loaded[index][key]), (index, key)
    assert gan.backend.trainer_state() == fresh.backend.trainer_state()  # scale 2 ** 13


def files_rank(rank: int, world: int, port: int, root: Path) -> None:
    """One of 2 gloo ranks: a DCP save; writes the files this rank reports to root/rank<r>.json."""
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    _, gan = tiny_gan()
    written = gan.backend.save_state(gan, root / "state")
    (root / f"rank{rank}.json").write_text(json.dumps([str(f) for f in written]))
    dist.barrier()
    dist.destroy_process_group()


def test_each_rank_returns_only_the_files_it_wrote(tmp_path):
    """Each rank fsyncs what save_state returns: its own files, not every rank's."""
    import json

    import torch.multiprocessing as mp
    from launching import free_port

    (tmp_path / "state").mkdir()
    mp.start_processes(files_rank, args=(2, free_port(), tmp_path), nprocs=2,
                       start_method="spawn")
    lists = [set(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in range(2)]
    assert lists[0] and lists[1] and not lists[0] & lists[1]
    assert lists[0] | lists[1] == {str(f) for f in (tmp_path / "state").iterdir()}
    assert str(tmp_path / "state" / ".metadata") in lists[0]
