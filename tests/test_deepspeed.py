"""The DeepSpeed backend with real processes: `accelerate launch --config_file
launch/deepspeed_zero{1,2}.yaml` on 2 CPU ranks (gloo), against the DDP path on the same data.

- ZeRO-1 and ZeRO-2 with gradient accumulation and clipping end with the DDP run's G, D and
  exported G_ema (fp32 on CPU; ~1e-7 apart from the clipping arithmetic, bitwise without);
- a ZeRO-2 run stopped by SIGTERM on one rank and resumed equals the uninterrupted one
  bitwise (weights, ZeRO optimizer partitions, EMA, every logged loss);
- spectral-norm state is identical on every rank, and a non-finite loss on one rank is
  skipped by both (tests/deepspeed_ranks.py); skipped at an accumulation boundary, it drops
  the window's gradients as on the DDP path (tests/skip_window.py);
- a DeepSpeed checkpoint refuses another world size, backend or ZeRO stage by name;
- a save whose write fails on one rank stops both with the same error naming the file
  (tests/deepspeed_save_failure.py), instead of leaving the other in DeepSpeed's barrier;
- DeepSpeed's native half precision (the fp16 path on GPUs, run here as native bf16 because
  DeepSpeed refuses fp16 on a CPU) trains, checkpoints and resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401  (Accelerate's DeepSpeed path imports it)
except ImportError as e:
    pytest.skip(f"DeepSpeed backend not testable: {e} (pip install -e '.[deepspeed]')",
                allow_module_level=True)

from launching import ROOT, TINY, free_port, launch
from safetensors.torch import load_file
from test_checkpoint import assert_same, losses, wait_for, workers
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from models.export import load_generator
from trainer.backends.deepspeed import DeepSpeedBackend
from trainer.checkpoint import Checkpointer, CheckpointError, IncompatibleCheckpoint

# Equivalence: accumulation over 2 batches and a clip that is active (|grad G| ~ 20,
# |grad D| ~ 4 at these sizes), a warm-up so the learning rate changes every step.
SAME = ["train.grad_accum=2", "optim.grad_clip=4.0", "optim.warmup_steps=6"]
STEPS = 8
RESUME_STEPS = 12


def train_args(shards: Path, runs: Path, name: str, steps: int, *extra: str,
               script: str = "trainer/main.py") -> list[str]:
    return [script, "--config", "configs/demo.yaml", f"data.shards={shards}",
            f"runs_dir={runs}", f"name={name}", *TINY, f"train.max_steps={steps}",
            "train.log_every=1", "train.val_every=0", "train.image_every=0",
            "train.checkpoint_every=4", *extra]


def ds_cmd(stage: int, *args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", f"launch/deepspeed_zero{stage}.yaml",
            "--num_processes", str(processes), "--main_process_port", str(free_port()), *args]


def ds_env() -> dict[str, str]:
    """CPU ranks on gloo, also on a GPU host: no visible GPU (else DeepSpeed takes NCCL and
    rank 1 asks for a second GPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn Accelerate's DeepSpeed path off
    return env


def ds_launch(stage: int, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(ds_cmd(stage, *args, processes=processes), capture_output=True,
                          text=True, cwd=ROOT, env=ds_env(), timeout=600)


def ddp_weights(run: Path) -> dict:
    out = run.parent / f"{run.name}-final.pt"
    dcp_to_torch_save(str(Checkpointer(run).latest()), str(out))
    state = torch.load(out, weights_only=False)
    return {"G": state["G"], "D": state["D"]}


def ds_state(run: Path, optimizer: bool = False) -> dict:
    """The latest DeepSpeed checkpoint of a run: module weights, EMA and (optionally) every
    rank's ZeRO partition of the fp32 master weights and Adam state."""
    ckpt = Checkpointer(run).latest()
    state = {"G_ema": load_file(str(ckpt / "G_ema.safetensors"))}
    for net in ("G", "D"):
        state[net] = torch.load(ckpt / net / "mp_rank_00_model_states.pt",
                                weights_only=False)["module"]
        for f in sorted((ckpt / net).glob("*optim_states.pt")) if optimizer else []:
            opt = torch.load(f, weights_only=False)["optimizer_state_dict"]
            state[f"{net}/{f.name}"] = {k: opt[k] for k in ("base_optimizer_state",
                                                             "single_partition_of_fp32_groups")}
    return state


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("ddp")
    result = launch(*train_args(shards, runs, "ddp", STEPS, *SAME, "train.checkpoint_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "ddp"


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_trains_like_ddp(shards, ddp_run, tmp_path, stage):
    result = ds_launch(stage, *train_args(shards, tmp_path, "ds", STEPS, *SAME,
                                          "train.checkpoint_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "ds"
    assert (run / "COMPLETE").exists()
    ckpt = Checkpointer(run).latest()
    assert ckpt.name == f"step_{STEPS:06d}" and (ckpt / "G").is_dir() and (ckpt / "D").is_dir()
    ds, ddp = ds_state(run), ddp_weights(ddp_run)
    for net in ("G", "D"):
        assert ds[net].keys() == ddp[net].keys()
        for k in ddp[net]:
            torch.testing.assert_close(ds[net][k], ddp[net][k], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k, net=net: f"{net}.{k}: {m}")
    G_ema, meta = load_generator(run / "export")
    ref_ema, _ = load_generator(ddp_run / "export")
    assert meta["step"] == STEPS
    for (k, a), b in zip(G_ema.state_dict().items(), ref_ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ds_losses, ddp_losses = losses(run), losses(ddp_run)
    assert sorted(ds_losses) == list(range(1, STEPS + 1))
    for s in ds_losses:
        assert ds_losses[s] == pytest.approx(ddp_losses[s], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def zero2_reference(shards, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("zero2")
    result = ds_launch(2, *train_args(shards, runs, "ref", RESUME_STEPS, "optim.warmup_steps=6"))
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "ref"


def test_stopped_and_resumed_zero2_run_equals_the_uninterrupted_one(shards, zero2_reference,
                                                                   tmp_path):
    args = train_args(shards, tmp_path, "cut", RESUME_STEPS, "optim.warmup_steps=6")
    proc = subprocess.Popen(ds_cmd(2, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=ds_env(), start_new_session=True)
    wait_for(tmp_path / "cut" / "checkpoints" / "step_000004", proc)
    os.kill(workers(proc)[1], signal.SIGTERM)  # one rank only: the ranks must agree
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert not (tmp_path / "cut" / "COMPLETE").exists()
    resumed = subprocess.run(ds_cmd(2, *args), capture_output=True, text=True, cwd=ROOT,
                             env=ds_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(resumed.stdout.split("resumed from", 1)[1].split("at step")[1].split()[0])
    assert 4 <= step < RESUME_STEPS
    assert (tmp_path / "cut" / "COMPLETE").exists()
    assert_same(ds_state(tmp_path / "cut", optimizer=True),
                ds_state(zero2_reference, optimizer=True))
    ref_losses, cut_losses = losses(zero2_reference), losses(tmp_path / "cut")
    assert sorted(cut_losses) == list(range(1, RESUME_STEPS + 1))
    assert all(cut_losses[s] == ref_losses[s] for s in range(step + 1, RESUME_STEPS + 1))


def test_another_world_size_is_refused_naming_the_checkpoint(shards, zero2_reference, tmp_path):
    latest = Checkpointer(zero2_reference).latest()
    result = ds_launch(2, *train_args(shards, tmp_path, "one", RESUME_STEPS + 2,
                                      f"resume_from={latest}"), processes=1)
    assert result.returncode == 1
    assert f"{latest}: a DeepSpeed ZeRO-2 checkpoint saved on 2 ranks cannot be resumed on 1" \
        in result.stderr
    assert "--num_processes 2" in result.stderr


def test_spectral_norm_state_is_identical_on_every_rank(shards, tmp_path):
    result = subprocess.run(ds_cmd(2, "tests/deepspeed_ranks.py", str(shards), str(tmp_path)),
                            capture_output=True, text=True, cwd=ROOT, env=ds_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("report-*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        assert r["start"] == [] and r["after_steps"] == [] and r["G_after_steps"] == []
        # a NaN on rank 1 only: both ranks skip both phases, then train on
        assert r["nan_skipped"] == ["Skipped/D", "Skipped/G"] and r["nan_G_unchanged"]
        assert r["next_step_trains"] and r["after_skip"] == []
        # the check sees a rank-0-only forward (so it can fail), and the broadcast repairs it
        assert any(n.startswith("buffer:") for n in r["rank0_forward_unsynced"])
        assert r["rank0_forward_synced"] == []
        assert r["after_resume"] == [] and r["resumed_equals_saved"]
        assert r["after_resume_step"] == []


def test_a_skipped_accumulation_boundary_drops_the_window_like_ddp(shards, tmp_path):
    script = ["tests/skip_window.py", str(shards)]
    ddp = launch(*script, str(tmp_path / "ddp.safetensors"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ds = subprocess.run(ds_cmd(2, *script, str(tmp_path / "ds.safetensors")),
                        capture_output=True, text=True, cwd=ROOT, env=ds_env(), timeout=600)
    assert ds.returncode == 0, ds.stderr[-3000:]
    ref, got = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("ddp", "ds"))
    assert ref.keys() == got.keys()
    for k in ref:  # rounding-level differences only (ZeRO-2 leaking the window: ~1e-3)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_checks_name_what_cannot_be_resumed(tmp_path):
    backend = object.__new__(DeepSpeedBackend)  # the checks need no engine
    backend.zero_stage = 2
    ckpt = tmp_path / "step_000010"
    (ckpt / "G").mkdir(parents=True)
    with pytest.raises(IncompatibleCheckpoint, match="saved by the DDP backend"):
        backend.check_state(ckpt, {"name": "ddp", "world_size": 1})
    with pytest.raises(IncompatibleCheckpoint, match="deepspeed_zero1.yaml"):
        backend.check_state(ckpt, {"name": "deepspeed", "zero_stage": 1, "world_size": 1})
    with pytest.raises(IncompatibleCheckpoint, match="saved on 4 ranks cannot be resumed on 1"):
        backend.check_state(ckpt, {"name": "deepspeed", "zero_stage": 2, "world_size": 4})
    with pytest.raises(CheckpointError, match="model_states"):  # damage: falls back
        backend.check_state(ckpt, {"name": "deepspeed", "zero_stage": 2, "world_size": 1})


def test_native_half_precision_trains_checkpoints_and_resumes(shards, tmp_path):
    args = train_args(shards, tmp_path, "half", 4, "train.mixed_precision=bf16",
                      script="tests/deepspeed_native.py")
    first = ds_launch(2, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = ds_launch(2, *args, "train.max_steps=6")  # later overrides win
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    run = tmp_path / "half"
    ckpt = Checkpointer(run).latest()
    assert ckpt.name == "step_000006"
    assert sorted(f.name for f in (ckpt / "G").glob("*optim_states.pt")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    weights = torch.load(ckpt / "D" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {v.dtype for k, v in weights.items() if not k.endswith(("._u", "._v"))} \
        == {torch.bfloat16}
    assert {v.dtype for k, v in weights.items() if k.endswith(("._u", "._v"))} == {torch.bfloat16}
    G_ema, meta = load_generator(run / "export")
    assert meta["step"] == 6
    assert {p.dtype for p in G_ema.parameters()} == {torch.float32}  # the EMA stays fp32
    assert all(torch.isfinite(p).all() for p in G_ema.parameters())
    assert set(losses(run)) == set(range(1, 7))


def test_launch_settings_that_contradict_the_config_stop_before_any_work(shards, monkeypatch):
    from trainer.config import load_config
    from trainer.launch import LaunchConfigError, deepspeed_plugins, make_accelerator

    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "optim.grad_clip=1.0"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(LaunchConfigError, match="unset ACCELERATE_USE_CPU"):
        make_accelerator(cfg, "no")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(LaunchConfigError, match="ZeRO stage 3 is not supported"):
        deepspeed_plugins(cfg, "no")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    with pytest.raises(LaunchConfigError, match="optim.grad_clip=1.0"):
        deepspeed_plugins(cfg, "no")
    monkeypatch.delenv("ACCELERATE_GRADIENT_CLIPPING")
    plugins = deepspeed_plugins(cfg, "bf16")
    assert set(plugins) == {"G", "D"} and plugins["G"].deepspeed_config is not \
        plugins["D"].deepspeed_config
    ds = plugins["D"].deepspeed_config
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


@pytest.mark.slow
def test_a_write_failure_on_one_rank_stops_every_rank_naming_the_file(tmp_path):
    """DeepSpeed's save runs barriers between its writes: a write failing inside it on one
    rank used to leave the other waiting in a barrier until the process-group timeout. The
    writes now come after DeepSpeed's collectives, and the ranks agree on the outcome."""
    proc = subprocess.Popen(ds_cmd(2, "tests/deepspeed_save_failure.py", str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=ds_env(), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                               text=True).stdout.split()
        for pid in [*map(int, ranks), proc.pid]:  # the ranks run in sessions of their own
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the ranks hung")
    assert proc.returncode == 0, output[-4000:]
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in range(2)]
    for r in reports:
        assert r["first"] == "step_000001"
        assert r["failed"] == reports[0]["failed"]  # one error, the same on both ranks
        assert r["left"] == ["latest", "step_000001"]  # no step_000002.tmp, latest kept
        assert r["resumed"] == ["step_000001", 1] and r["then"] == "step_000003"
    partition = tmp_path / "run/checkpoints/step_000002.tmp/G"
    partition /= "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's first file
    assert reports[0]["failed"] == f"checkpoint not saved: File too large writing {partition}"
