"""The trainer with real processes: `accelerate launch` on 2 CPU ranks (gloo)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from launching import ROOT, TINY, free_port, launch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models.export import load_generator
from trainer.config import load_config
from trainer.data import Batch
from trainer.main import main
from trainer.train import build_gan, make_val_loader


def test_demo_config_trains_end_to_end_on_two_processes(shards, tmp_path):
    runs = tmp_path / "runs"
    result = launch("trainer/main.py", "--config", "configs/demo.yaml",
                    f"data.shards={shards}", f"runs_dir={runs}", "name=e2e",
                    "data.crop_size=32", "data.batch_size=2", "model.ngf=8", "model.ndf=8",
                    "train.max_steps=6", "train.log_every=2", "train.image_every=3",
                    "train.val_every=3")
    assert result.returncode == 0, result.stderr[-4000:]
    run = runs / "e2e"
    assert (run / "config.yaml").is_file()
    assert not (run / "LOCK").exists()  # released at the end
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    for key in ("psnr", "ssim", "cdc", "cdc_truth", "warp", "warp_truth", "psnr_grey",
                "psnr_gain"):
        assert key in records[-1]
    assert 5.0 < records[-1]["psnr"] < 60.0
    # the same val pixels at every validation: the grey baseline scores exactly alike
    assert records[0]["psnr_grey"] == records[1]["psnr_grey"]
    G, meta = load_generator(run / "export")
    assert meta["step"] == 6 and meta["model"]["ngf"] == 8
    assert "validation (EMA generator, val split)" in result.stdout
    assert "psnr" in result.stdout and "floor" in result.stdout

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    for tag in ("Loss/G/total", "Loss/G/adv", "Loss/G/pixel", "Loss/D/total", "Loss/D/real",
                "Loss/D/fake", "LR/G", "LR/D", "Grad/G", "Grad/D", "Skipped/total",
                "Timing/data_wait_fraction", "Timing/triplets_per_s", "Metrics/val/psnr",
                "Metrics/val/ssim", "Metrics/val/cdc", "Metrics/val/warp",
                "Metrics/val/psnr_gain"):
        assert tag in scalars, tag
    assert any(t.startswith("SpectralNorm/sigma/") for t in scalars)
    assert [e.step for e in events.Scalars("Loss/G/total")] == [2, 4, 6]
    assert {"Images/train", "Images/val"} <= images
    image = events.Images("Images/train")[0]
    assert image.width == 9 * 32 and image.height >= 32


def test_world_size_guard_refuses_a_mismatch(shards, tmp_path):
    # Without ACCELERATE_USE_CPU, --multi_gpu on a CPU host starts ranks that each think
    # they are alone: the trainer must refuse instead of training twice.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--main_process_port", str(free_port()), "trainer/main.py",
         "--config", "configs/demo.yaml", f"data.shards={shards}", f"runs_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode != 0
    assert "processes but the Accelerator sees" in result.stderr


def test_config_errors_stop_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "trainer/main.py", "--config", "configs/demo.yaml",
                             "data.shards=/nonexistent", "train.epochs=2"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "data.shards" in result.stderr


@pytest.mark.parametrize("mode", ["sync", "--no-sync"])
def test_spectral_norm_state_is_identical_on_every_rank(shards, tmp_path, mode):
    result = launch("tests/sn_ranks.py", str(shards), str(tmp_path), mode)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("report-*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        if mode == "sync":
            assert r["start"] == [] and r["after_steps"] == [] and r["G_after_steps"] == []
            # the check sees a rank-0-only forward, and the broadcast repairs it
            assert r["rank0_forward_unsynced"] and all(
                n.startswith("buffer:") or n.startswith("sigma:")
                for n in r["rank0_forward_unsynced"])
            assert r["rank0_forward_synced"] == []
            assert r["after_resume"] == [] and r["after_resume_step"] == []
        else:  # the negative twin: nothing synchronizes, and the check says so
            assert any(n.startswith("buffer:") for n in r["start"])
            assert any(n.startswith("param:") for n in r["start"])


def test_a_non_finite_loss_is_skipped_and_counted(shards):
    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", "model.ngf=8",
                                            "model.ndf=8"])
    accelerator = Accelerator(cpu=True)
    gan = build_gan(cfg, accelerator)
    before = [p.detach().clone() for p in gan.G.parameters()]
    cond = torch.zeros(2, 3, 1, 32, 32)
    cond[0, 1, 0, 0, 0] = float("nan")
    from trainer.step import train_step

    out = train_step(accelerator, gan, Batch(cond, torch.zeros(2, 3, 2, 32, 32), ["a", "b"]))
    assert out["Skipped/D"] == 1 and out["Skipped/G"] == 1  # device tensors, read in the test
    assert all(torch.equal(a, b) for a, b in zip(before, gan.G.parameters()))
    good = Batch(torch.zeros(2, 3, 1, 32, 32), torch.zeros(2, 3, 2, 32, 32), ["a", "b"])
    out = train_step(accelerator, gan, good)
    assert not out["Skipped/G"] and torch.isfinite(out["Loss/G/total"])
    assert not all(torch.equal(a, b) for a, b in zip(before, gan.G.parameters()))


def test_ema_warms_up_then_follows_its_decay():
    from trainer.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # n = 0: decay 0.1, the average jumps most of the way
    assert ema.model.weight.item() == pytest.approx(0.9)
    for _ in range(2000):
        ema.update(model)
    assert ema.model.weight.item() == pytest.approx(1.0, abs=1e-6)
    state = ema.state_dict()
    assert int(state["_num_updates"]) == 2001
    fresh = EMA(model, decay=0.999)
    fresh.load_state_dict(state)
    assert int(fresh.num_updates) == 2001 and fresh.model.weight.item() == ema.model.weight.item()


def test_channels_last_trains_the_same_model_in_nhwc(shards):
    """train.channels_last: G, D and the EMA copy hold NHWC weights, the optimizers step those
    very tensors, and the step computes what the default layout computes (up to rounding)."""
    from trainer.step import train_step

    g = torch.Generator().manual_seed(0)
    batches = [Batch(torch.rand(2, 3, 1, 32, 32, generator=g) * 2 - 1,
                     torch.rand(2, 3, 2, 32, 32, generator=g) - 0.5, ["a", "b"])
               for _ in range(3)]
    results = {}
    for channels_last in (False, True):
        cfg = load_config("configs/demo.yaml", [
            f"data.shards={shards}", "model.ngf=8", "model.ndf=8",
            f"train.channels_last={channels_last}"])
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        gan = build_gan(cfg, accelerator)
        convs = [p for m in (gan.G, gan.D, gan.ema.model) for p in m.parameters() if p.ndim == 4]
        nhwc = [p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                for p in convs if p.shape[1] > 1 and p.shape[-1] > 1]
        assert nhwc and all(nhwc) == channels_last and any(nhwc) == channels_last
        adam = {id(p) for group in gan.opt_G.param_groups for p in group["params"]}
        assert {id(p) for p in gan.G.parameters()} == adam
        start = [p.detach().clone() for p in gan.G.parameters()]
        losses = [float(train_step(accelerator, gan, b)["Loss/G/total"]) for b in batches]
        weights = [p.detach().clone() for p in gan.G.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(start, weights))  # every weight trained
        results[channels_last] = losses, weights
    (l0, w0), (l1, w1) = results[False], results[True]
    assert l1 == pytest.approx(l0, rel=1e-4)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


# -- refusals: checked before anything is written, one line, exit 1 (in-process, 1 rank) ------

def run_args(shards, runs, *extra: str) -> list[str]:
    return ["--config", "configs/demo.yaml", f"data.shards={shards}", f"runs_dir={runs}",
            "name=run", *TINY, "train.max_steps=2", "train.log_every=1", "train.image_every=0",
            "train.mixed_precision=no", *extra]


def run_main(args: list[str]) -> int:
    """trainer.main.main in this process, on CPU (as the other in-process tests) even on a GPU
    host: the Accelerator's state is per process."""
    before = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        return main(args)
    finally:
        if before is None:
            del os.environ["ACCELERATE_USE_CPU"]
        else:
            os.environ["ACCELERATE_USE_CPU"] = before


def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def damaged_val(shards, tmp_path_factory):
    """The shards with every val shard truncated: the manifest still counts 36 val samples,
    the scan finds none."""
    copy = tmp_path_factory.mktemp("damaged-val") / "shards"
    shutil.copytree(shards, copy)
    for tar in copy.glob("val-*.tar"):
        with open(tar, "r+b") as f:
            f.truncate(1000)
    return copy


@pytest.fixture(scope="module")
def finished(damaged_val, tmp_path_factory):
    """A complete 2-step run on `damaged_val`: validation turned off from the scan."""
    runs = tmp_path_factory.mktemp("finished")
    with warnings_to_stderr():
        assert run_main(run_args(damaged_val, runs)) == 0
    return runs / "run"


@contextlib.contextmanager
def warnings_to_stderr():
    """The trainer's warnings, whatever pytest's logging capture does, go to sys.stderr."""
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("trainer").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("trainer").removeHandler(handler)


def test_validation_is_decided_by_the_scan_not_the_manifest(shards, damaged_val, finished,
                                                             tmp_path):
    # the manifest counts val samples the scan cannot read: validation off, training goes on
    assert (finished / "COMPLETE").is_file() and not (finished / "metrics.jsonl").exists()
    accelerator = Accelerator(cpu=True)
    assert make_val_loader(load_config("configs/demo.yaml", [f"data.shards={damaged_val}",
                                                             *TINY]), accelerator, "grey") is None
    # the manifest counts no val sample but the shards hold them: validation on
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["samples"] = 0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config("configs/demo.yaml", [f"data.shards={copy}", *TINY])
    val = make_val_loader(cfg, accelerator, "grey")
    assert val is not None and len(val.samples) == 36


def test_a_refused_relaunch_leaves_the_run_as_it_was(damaged_val, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = snapshot(run)
    assert "config.yaml" in before and "COMPLETE" in before
    capsys.readouterr()

    # another model: refused by the checkpointer, after the data scan
    assert run_main(run_args(damaged_val, tmp_path, "model.ngf=16")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("checkpoint error: ")
    assert "trainer.json: saved with another model config" in err[0] and "ngf" in err[0]
    assert snapshot(run) == before

    # --no-resume with a crop larger than the frames: nothing is moved aside
    assert run_main(run_args(damaged_val, tmp_path, "--no-resume", "data.crop_size=128")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data error: ") and "data.crop_size" in err[0]
    assert snapshot(run) == before and not list(tmp_path.glob("run/checkpoints.before-*"))

    # a manifest entry outside the shard folder (shards.manifest.ManifestError)
    bad = tmp_path / "bad-shards"
    shutil.copytree(damaged_val, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["tar"] = "../elsewhere.tar"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert run_main(run_args(bad, tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data error: ") and "../elsewhere.tar" in err[0]
    assert snapshot(run) == before

    # a refused first launch leaves no run directory behind
    first = run_args(damaged_val, tmp_path, "name=first", "data.crop_size=128")
    assert run_main(first) == 1 and not (tmp_path / "first").exists()


# -- the run directory lock ---------------------------------------------------------------

HOLD = """
import sys, time
from trainer.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(300)
"""


@contextlib.contextmanager
def lock_holder(run):
    """Another live process holding `run`'s lock; SIGKILLed on exit, so its LOCK stays behind,
    naming a dead process."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_is_refused_and_a_killed_one_taken_over(damaged_val, finished, tmp_path,
                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with lock_holder(run) as holder:  # SIGKILLed at the end: the lock stays behind
        before = snapshot(run)
        capsys.readouterr()
        assert run_main(run_args(damaged_val, tmp_path)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"run directory error: {run / 'LOCK'}: ")
        assert f"pid {holder.pid} " in err[0] and socket.gethostname() in err[0]
        assert snapshot(run) == before  # LOCK is the holder's
    assert str(holder.pid) in (run / "LOCK").read_text()
    with warnings_to_stderr():
        assert run_main(run_args(damaged_val, tmp_path, "train.max_steps=3")) == 0
    out, err = capsys.readouterr()
    assert "at step 2" in out.split("resumed from", 1)[1]  # the same run, continued
    assert f"taking over the lock of host {socket.gethostname()} pid {holder.pid}" in err
    assert "its process is gone" in err
    assert (run / "COMPLETE").is_file() and not (run / "LOCK").exists()  # released at the end


@pytest.mark.slow
def test_refusals_on_two_ranks_are_one_line_and_every_rank_exits(damaged_val, finished,
                                                                 tmp_path):
    """The main process's decisions (run lock, data) reach every rank: no rank trains on or
    waits alone, and the error is said once, not as a traceback per rank."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with lock_holder(run) as holder:
        locked = launch("trainer/main.py", *run_args(damaged_val, tmp_path), timeout=300)
    assert locked.returncode != 0
    assert locked.stderr.count("run directory error:") == 1, locked.stderr[-3000:]
    assert f"pid {holder.pid} " in locked.stderr and "Traceback" not in locked.stdout

    no_data = launch("trainer/main.py", *run_args(damaged_val, tmp_path, "data.crop_size=128"),
                     timeout=300)
    assert no_data.returncode != 0
    assert no_data.stderr.count("data error:") == 1, no_data.stderr[-3000:]
    assert "smaller than data.crop_size" in no_data.stderr
    assert "NoSamplesError" not in no_data.stderr  # no traceback from any rank


# -- learning-rate schedule under gradient accumulation -------------------------------------

def test_with_grad_accum_the_schedule_counts_optimizer_steps_also_across_a_resume(
        shards, tmp_path, monkeypatch, capsys):
    """grad_accum=2 over 10 batches: 5 optimizer steps, so after n batches the LR is the
    schedule's at n // 2 (warm-up 2, then linear decay over 5). A run stopped at batch 5,
    inside a window, and resumed keeps the windows (and the LR) of the uninterrupted one."""
    from test_checkpoint import losses

    from trainer.train import lr_lambda

    settings = ["train.grad_accum=2", "optim.warmup_steps=2", "optim.decay=linear",
                "train.max_steps=10", "train.checkpoint_every=0", "train.val_every=0"]
    assert run_main(run_args(shards, tmp_path, "name=whole", *settings)) == 0
    cfg = load_config("configs/demo.yaml", [f"data.shards={shards}", *settings])
    factor = lr_lambda(cfg, 5)
    expected = {n: cfg.optim.lr_g * factor(n // 2) for n in range(1, 11)}
    assert losses(tmp_path / "whole", "LR/G") == pytest.approx(expected)

    stop_file = tmp_path / "stop"
    stop_file.touch()  # read at the first agreement: step 5
    monkeypatch.setenv("TRICOLOR_STOP_FILE", str(stop_file))
    cut = run_args(shards, tmp_path, "name=cut", *settings, "train.stop_check_every=5")
    assert run_main(cut) == 0 and not (tmp_path / "cut" / "COMPLETE").exists()
    stop_file.unlink()
    capsys.readouterr()
    assert run_main(cut) == 0
    assert "at step 5" in capsys.readouterr().out.split("resumed from", 1)[1]
    assert losses(tmp_path / "cut", "LR/G") == pytest.approx(expected)


# -- precision `auto` follows the launch, not the host ----------------------------------------

def test_auto_precision_is_decided_by_the_launched_device(monkeypatch):
    from trainer.launch import precision

    cfg = load_config("configs/demo.yaml", ["data.shards=/nonexistent"], require_data=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        including_emulation or "native" in os.environ.get("GPU", ""))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # CPU ranks on a GPU host
    assert precision(cfg) == "no"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setenv("GPU", "native")
    assert precision(cfg) == "bf16"
    monkeypatch.setenv("GPU", "emulated")  # pre-Ampere: bf16 emulated, slow
    assert precision(cfg) == "no"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CUDA_VISIBLE_DEVICES=""
    assert precision(cfg) == "no"
    fp16 = load_config("configs/demo.yaml", ["data.shards=/nonexistent",
                                             "train.mixed_precision=fp16"], require_data=False)
    assert precision(fp16) == "fp16"  # an explicit choice is kept


# -- the process group is destroyed on every exit ---------------------------------------------

EXIT_REPORT = """
import sys
import torch.distributed as dist
from trainer.main import main
status = main(sys.argv[1:])
print(f"exit {status} process group alive {dist.is_initialized()}", flush=True)
sys.exit(status)
"""


def test_a_refused_launch_destroys_the_process_group(damaged_val, tmp_path):
    script = tmp_path / "exit_report.py"
    script.write_text(EXIT_REPORT)
    result = launch(str(script), *run_args(damaged_val, tmp_path, "data.crop_size=128"),
                    timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("data error:") == 1, result.stderr[-3000:]
    assert result.stdout.count("exit 1 process group alive False") == 2, result.stdout[-3000:]
    # NCCL builds warn at exit about a group left alive (gloo here says nothing either way)
    assert "destroy_process_group" not in result.stderr
