"""`make gpu-check` on the CPU side (gpu/check.py, gpu/stages.py, tools/wheels.py): the one-line
refusal without CUDA, the report and its exit status, the wheel parts and their checksums,
the install from carried folders, the sync census's counting, the trainer stage command lines,
the stage limits against docs/gpu-check.md, the resume-exactness stage (bitwise on the CPU; an
incomplete restore seen; deterministic mode unavailable reported) and its check of the EMA
copy's forward, and the stages themselves rehearsed on the CPU at tiny shapes. Nothing
here needs a GPU, and nothing depends on one being there (CUDA is hidden from the
subprocesses)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from test_gpu_paths import batch, tiny

import gpu.check as gpu_check
import gpu.resume as gpu_resume
import gpu.stages as gpu_stages
import tools.wheels as gpu_wheels
from gpu.census import SYNC_MESSAGE, SyncCensus, count_sync_warnings
from gpu.check import exit_status, run_stage_process, write_report
from gpu.context import Context
from gpu.shards import SHARD_SETS, build_stage_shards
from gpu.train import TRAIN_PLANS, train_commands
from shards.tario import sha256_file
from tools.wheels import install, join_parts, pack, split_file

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_no_cuda_prints_one_line_and_exits_2(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "gpu.check", "run", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, env=NO_CUDA,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = _lines(proc.stdout + proc.stderr)
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not out.exists() and not (tmp_path / "work").exists()  # nothing was touched


def test_make_gpu_check_without_cuda(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"BENCH_OUT={tmp_path / 'out'}",
                           f"GPU_PY={sys.executable}"], cwd=ROOT, env=NO_CUDA,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(_lines(proc.stdout)) == 1 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "out").exists()


def _result(name, status, **kw):
    return {"name": name, "status": status, "budget_s": 10, "duration_s": 1.5,
            "reason": kw.get("reason", ""), "figures": kw.get("figures", {}),
            "checks": kw.get("checks", []), "log_tail": ["line 1", "Traceback: boom"]}


def test_report_md_and_json_a_failed_stage_fails(tmp_path):
    results = [
        _result("env", "pass", figures={"gpu": "X", "nested": {"a": 1}}),
        _result("dali", "skip", reason="DALI absent"),
        _result("train_fp16", "fail", reason="failed: resume launch exits 0",
                checks=[{"name": "resume launch exits 0", "ok": False, "detail": "1"}]),
    ]
    md, js = write_report(tmp_path, {"torch": "2.11", "dali": "absent"}, {"dali": "incomplete"},
                          results, 12.0)
    data = json.loads(js.read_text())
    assert data["exit_status"] == 1 and [s["status"] for s in data["stages"]] == [
        "pass", "skip", "fail"]
    text = md.read_text()
    assert "FAILED" in text and "| dali | skip |" in text and "DALI absent" in text
    assert "FAIL: resume launch exits 0" in text and "Traceback: boom" in text
    assert "| torch | 2.11 |" in text and "| wheel set dali | incomplete |" in text
    # skipped (a package the host lacks) is not a failure; a timeout is
    assert exit_status([_result("env", "pass"), _result("dali", "skip")]) == 0
    assert exit_status([_result("env", "pass"), _result("dali", "timeout")]) == 1


def test_split_join_sha256_round_trip(tmp_path):
    whole = tmp_path / "big.whl"
    whole.write_bytes(os.urandom(2500))
    a, b, dest = (tmp_path / x for x in ("a", "b", "dest"))
    for d in (a, b, dest):
        d.mkdir()
    parts = split_file(whole, a, part_bytes=1000)
    assert [p["bytes"] for p in parts] == [1000, 1000, 500]
    assert [p["name"] for p in parts] == [f"big.whl.part{i:03d}" for i in range(3)]
    (a / parts[1]["name"]).rename(b / parts[1]["name"])  # carried in another call
    entry = {"name": "big.whl", "sha256": hashlib.sha256(whole.read_bytes()).hexdigest(),
             "parts": parts}
    joined = join_parts(entry, [a, b], dest)
    assert joined.read_bytes() == whole.read_bytes()
    bad = bytearray((b / parts[1]["name"]).read_bytes())
    bad[0] ^= 1
    (b / parts[1]["name"]).write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="sha256"):
        join_parts(entry, [a, b], dest)
    (b / parts[1]["name"]).unlink()
    with pytest.raises(FileNotFoundError):
        join_parts(entry, [a, b], dest)
    bins = pack([("x", 40), ("y", 30), ("z", 25), ("w", 5)], cap=60)
    assert sorted(sum(bins, [])) == ["w", "x", "y", "z"] and len(bins) == 2
    with pytest.raises(ValueError):
        pack([("huge", 61)], cap=60)


def _fake_wheel(folder: Path, name: str, requires: str = "") -> Path:
    """A minimal pure-Python wheel holding module `name` (installable offline)."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{requires}")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                    "true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_install_joins_parts_across_calls_and_skips_incomplete_sets(tmp_path, monkeypatch):
    src, wheels, stash = tmp_path / "src", tmp_path / ".gpu-wheels", tmp_path / "stash"
    for d in (src, wheels / "base", wheels / "dali-2", stash / "dali-1"):
        d.mkdir(parents=True)
    monkeypatch.setattr(gpu_wheels, "STASH", stash)
    good = _fake_wheel(src, "tricolor_fake_good")
    parts = split_file(good, wheels / "base", part_bytes=300)
    assert len(parts) >= 2
    # the first part came in an earlier call and was stashed; the rest in this call
    (wheels / "base" / parts[0]["name"]).rename(stash / "dali-1" / parts[0]["name"])
    lost = _fake_wheel(src, "tricolor_fake_lost")
    manifest = {"created": "2026-12-01 00:00:00 UTC", "files": [
        {"name": good.name, "set": "dali", "sha256": sha256_file(good), "parts": parts},
        {"name": lost.name, "set": "av", "sha256": sha256_file(lost), "parts": []},
    ]}
    (wheels / "base" / "manifest.json").write_text(json.dumps(manifest))
    site = tmp_path / "site"
    status = install(wheels, site, log=lambda msg: None)
    assert status["dali"] == "installed", status
    assert status["av"].startswith("incomplete"), status
    assert (site / "tricolor_fake_good.py").read_text() == "VALUE = 42\n"
    assert not (site / "tricolor_fake_lost.py").exists()
    assert install(tmp_path / "nowhere", site)["all"].startswith("no manifest.json")


def test_wheel_requirements_against_the_host(tmp_path):
    """numpy is on the host, tomli only for Python < 3.11 (the host runs 3.12), pytest only
    for an extra: what is left unmet is braceexpand, unless it is carried too."""
    w = _fake_wheel(tmp_path, "tricolor_fake_req", "Requires-Dist: numpy\n"
                    "Requires-Dist: braceexpand\nRequires-Dist: tomli; python_version < '3.11'\n"
                    "Requires-Dist: pytest; extra == 'dev'\n")
    assert gpu_wheels.unmet([w]) == ["tricolor_fake_req-1.0-py3-none-any.whl: braceexpand"]
    assert gpu_wheels.unmet([w, _fake_wheel(tmp_path, "braceexpand")]) == []


def test_count_sync_warnings_counts_only_sync_debug_warnings():
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for _ in range(3):
            warnings.warn(f"called a synchronizing CUDA operation: {SYNC_MESSAGE}", UserWarning,
                          stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    n, sites = count_sync_warnings(records)
    assert n == 3 and len(sites) == 1
    assert next(iter(sites)).startswith("tests/test_gpu_check.py:")
    census = SyncCensus(cuda=False)
    for k in (2, 0):
        with census.count() as counted:
            for _ in range(k):
                warnings.warn(SYNC_MESSAGE, UserWarning, stacklevel=1)
            warnings.warn("not a sync", UserWarning, stacklevel=1)
        assert counted[0] == k
    assert sum(census.sites.values()) == 2


@pytest.mark.parametrize("plan", sorted(TRAIN_PLANS))
def test_train_stage_command_lines_parse(plan, tmp_path):
    first, second = train_commands(plan, tmp_path / "shards", tmp_path / "runs")
    launch, steps, more, _ = TRAIN_PLANS[plan]
    for argv in (first, second):
        assert argv[argv.index("--config_file") + 1] == launch
        assert argv[argv.index("--num_processes") + 1] == "1"
        assert (ROOT / launch).is_file()
    assert "--no-resume" in first and "--no-resume" not in second
    assert f"train.max_steps={steps}" in first and f"train.max_steps={more}" in second
    for argv in (first, second):
        main = argv.index("trainer/main.py")
        proc = subprocess.run([sys.executable, *argv[main:], "--dry-run"], cwd=ROOT,
                              env=NO_CUDA, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "mixed_precision: " + ("bf16" if plan == "bf16" else "fp16") in proc.stdout


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-shards")
    sizes = build_stage_shards(out, scale=0.5)
    assert set(sizes) == {"small", "large"} and all(v > 0 for v in sizes.values())
    return out


def test_stage_shards_have_what_the_stages_need(tiny_shards):
    small = json.loads((tiny_shards / "small" / "manifest.json").read_text())["splits"]
    large = json.loads((tiny_shards / "large" / "manifest.json").read_text())["splits"]
    assert small["train"]["samples"] >= 16 and small["val"]["samples"] >= 4
    assert min(large["train"]["frame_sizes"][0]) >= 64 and large["train"]["samples"] >= 16
    # full size (make gpu-wheels): 480 crops from 512x512 frames
    clips, short, _ = SHARD_SETS["large"]
    assert short >= 480 and all(min(w, h) >= 480 for _, w, h in clips)


@pytest.mark.slow
def test_stages_rehearsed_on_cpu(tiny_shards, tmp_path):
    """The runner end to end on the CPU: stage processes, the report, the exit status; the
    trainer stage through `accelerate launch` (one CPU rank, fp32) with its resume checks."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "gpu.check", "run", "--cpu-rehearsal", "--no-install",
         "--shards", str(tiny_shards), "--only",
         "env,census_fp32,resume_exactness,train_fp16,step_480",
         "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, env=NO_CUDA, capture_output=True, text=True, timeout=600)
    data = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in data["stages"]}
    assert proc.returncode == 0 and data["exit_status"] == 0, proc.stdout[-3000:]
    assert [s["status"] for s in stages.values()] == ["pass"] * 5
    train = stages["train_fp16"]
    assert all(c["ok"] for c in train["checks"]) and len(train["checks"]) >= 8
    assert train["figures"]["last_validation"]["step"] == 40
    assert stages["census_fp32"]["figures"]["lineart"]["train_step_syncs_per_step"] == [0, 0]
    assert stages["resume_exactness"]["figures"]["fp32"]["default"]["G"]["bitwise"]
    assert stages["step_480"]["figures"][
        "channels_last=True cudnn.benchmark=True"]["ms_per_step"] > 0
    assert data["environment"]["torch"] and (out / "gpu_check.md").is_file()


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path):
    args = argparse.Namespace(work=tmp_path, shards=tmp_path, cpu_rehearsal=True)
    result = run_stage_process("step_480", 0.5, args, NO_CUDA, log=lambda msg: None)
    assert result["status"] == "timeout" and "limit" in result["reason"]
    assert exit_status([result]) == 1


# ---------------------------------------------------------------------------------------------
# resume_exactness: the in-memory snapshot/restore, and the EMA copy's forward.


def test_stage_limits_add_up_and_match_the_doc():
    stages = {s.name: s.budget_s for s in gpu_stages.STAGES}
    assert sum(stages.values()) + gpu_check.INSTALL_BUDGET_S == gpu_check.TOTAL_BUDGET_S
    assert set(stages) == set(gpu_stages.RUNNERS)
    rows = {m[1]: int(m[2]) for m in re.finditer(r"^\| (\w+) \| (\d+) \|",
                                                  (ROOT / "docs" / "gpu-check.md").read_text(),
                                                  re.MULTILINE)}
    assert rows == {"install": gpu_check.INSTALL_BUDGET_S, **stages}


def test_resume_exactness_rehearsed_on_cpu_is_bitwise(tiny_shards, tmp_path, fresh_state):
    """CPU: a resume from the in-memory snapshot repeats the same steps bitwise (the repo's
    claim), in bf16 and fp32, with and without deterministic algorithms; the bf16 EMA copy
    runs the class's forward in fp32 while the training G has Accelerate's wrapper."""
    ctx = Context(tmp_path, tiny_shards, "cpu", tiny=True)
    result = gpu_stages.run_stage("resume_exactness", ctx)
    assert result["status"] == "pass", result
    assert all(c["ok"] for c in result["checks"]) and len(result["checks"]) == 7
    figures = result["figures"]
    for precision in ("bf16", "fp32"):
        det = figures[precision]["deterministic"]
        assert det["available"], det
        for diffs in (figures[precision]["default"], det["differences"]):
            assert set(diffs) == {"G", "D", "G_ema", "opt_G", "opt_D"}
            for part in diffs.values():
                assert part["max_abs"] == 0.0 and part["max_rel"] == 0.0 and part["bitwise"]
    p1 = figures["p1_ema_forward"]
    assert p1["training_G_has_instance_forward"]  # else the EMA check would prove nothing
    assert p1["ema_instance_attributes"] == [] and p1["ema_output_dtype"] == "torch.float32"
    import torch

    assert not torch.are_deterministic_algorithms_enabled()  # the stage put it back


def test_resume_exactness_sees_an_incomplete_restore(tmp_path, fresh_state, monkeypatch):
    """The zeros above are not vacuous: a restore that leaves the optimizers' moments as they
    were after run A makes run B differ."""
    full = gpu_resume.restore

    def without_optimizers(gan, state):
        full(gan, {**state, "opt_G": gan.opt_G.state_dict(), "opt_D": gan.opt_D.state_dict()})

    ctx = Context(tmp_path, tmp_path, "cpu", tiny=True)
    batches = [batch(seed=i) for i in range(3)]
    diffs, _ = gpu_resume.resume_run(ctx, tiny(), "fp32", batches, 1, 2)
    assert all(p["bitwise"] for p in diffs.values()), diffs
    monkeypatch.setattr(gpu_resume, "restore", without_optimizers)
    diffs, _ = gpu_resume.resume_run(ctx, tiny(), "fp32", batches, 1, 2)
    assert diffs["G"]["max_abs"] > 0 and not diffs["G"]["bitwise"] and diffs["G"]["worst"]
    assert diffs["opt_G"]["max_rel"] > 0 and not diffs["D"]["bitwise"]


def test_p1_check_fails_for_an_ema_copy_with_the_autocast_wrapper(tmp_path, fresh_state):
    """What the EMA check catches: a plain deepcopy of the prepared G carries Accelerate's
    instance `forward` (autocast, outputs cast to fp32: the dtype alone does not tell)."""
    import copy

    from trainer.train import build_gan

    accelerator = gpu_resume.fresh_accelerator("bf16", cpu=True)
    gan = build_gan(tiny(), accelerator)
    one = batch()
    ctx = Context(tmp_path, tmp_path, "cpu", tiny=True)
    gpu_resume.ema_forward_checks(ctx, gan, one, "bf16")
    assert [c["ok"] for c in ctx.checks] == [True, True, True]
    gan.ema.model = copy.deepcopy(gan.backend.unwrap(gan.G)).eval().requires_grad_(False)
    ctx = Context(tmp_path, tmp_path, "cpu", tiny=True)
    figures = gpu_resume.ema_forward_checks(ctx, gan, one, "bf16")
    assert [c["ok"] for c in ctx.checks] == [False, True, True], ctx.checks
    assert figures["ema_instance_attributes"] == ["_original_forward", "forward"]


def test_nondeterministic_op_names_the_op():
    message = ("upsample_bilinear2d_backward_out_cuda does not have a deterministic "
               "implementation, but you set 'torch.use_deterministic_algorithms(True)'. You can "
               "turn off determinism just for this operation, ...")
    assert gpu_resume.nondeterministic_op(message) == "upsample_bilinear2d_backward_out_cuda"
    assert gpu_resume.nondeterministic_op("other\nlines") == "other"


def test_deterministic_mode_unavailable_is_reported_not_failed(tiny_shards, tmp_path,
                                                               monkeypatch, fresh_state):
    """Where an op raises under torch.use_deterministic_algorithms(True) (CUDA's bilinear
    upsampling backward), the stage names it, runs again with warn_only to list every such
    op, and still passes on the default mode's figures."""
    import torch

    message = ("upsample_bilinear2d_backward_out_cuda does not have a deterministic "
               "implementation, but you set 'torch.use_deterministic_algorithms(True)'.")
    zero = {"max_abs": 0.0, "max_rel": 0.0, "bitwise": True, "worst": ""}

    def fake_run(ctx, cfg, precision, batches, warmup, steps, ema_check=False):
        assert len(batches) == warmup + steps
        if torch.are_deterministic_algorithms_enabled():
            if not torch.is_deterministic_algorithms_warn_only_enabled():
                raise RuntimeError(message)
            warnings.warn(message, UserWarning, stacklevel=1)
            warnings.warn(message.replace("upsample_bilinear2d", "grid_sampler_2d"),
                          UserWarning, stacklevel=1)
        return {n: dict(zero) for n in ("G", "D", "G_ema", "opt_G", "opt_D")}, {}

    monkeypatch.setattr(gpu_resume, "resume_run", fake_run)
    ctx = Context(tmp_path, tiny_shards, "cpu", tiny=True)
    result = gpu_stages.run_stage("resume_exactness", ctx)
    assert result["status"] == "pass", result
    det = result["figures"]["fp32"]["deterministic"]
    assert det["available"] is False
    assert det["raised_by"] == "upsample_bilinear2d_backward_out_cuda"
    assert det["ops_without_deterministic_kernel"] == [
        "grid_sampler_2d_backward_out_cuda", "upsample_bilinear2d_backward_out_cuda"]
    assert det["warn_only_differences"]["G"]["bitwise"]
    assert not torch.are_deterministic_algorithms_enabled()
