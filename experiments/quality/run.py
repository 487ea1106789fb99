"""`make quality`'s training and scoring, and the command: every variant trained as `make demo`
trains, scored with tricolor-eval (automatic and keyframe protocols), its strip colorized;
then docs/quality.md (report.py). See experiments/quality/__init__.py."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.common import gpu_name, machine
from experiments import quality as package
from experiments.quality.common import ROOT, log, run_cmd
from experiments.quality.data import prepare_data
from experiments.quality.recipes import (
    DEFAULT_VARIANTS,
    DEMO,
    KEYFRAMES,
    MULTI_SEED,
    VARIANTS,
    overrides,
)
from experiments.quality.report import write_report
from experiments.quality.scores import per_video, protocol_of


def launcher() -> tuple[list[str], dict, int]:
    """(launch command, environment, processes): two CPU processes on gloo as `make demo`
    trains on a CPU host; one GPU where there is one."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    if gpu_name():
        return [accelerate, "launch", "--config_file", "launch/single_gpu.yaml"], {}, 1
    return ([accelerate, "launch", "--config_file", "launch/cpu.yaml"],
            {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, 2)


def train_and_score(name: str, seed: int, args, data: dict, out: Path) -> dict:
    run = f"{name}_s{seed}"
    preset = VARIANTS[name][0]
    over = [f"name={run}", f"runs_dir={out / 'runs'}", f"data.shards={data['shards']}",
            f"train.max_steps={args.steps}", f"data.crop_size={args.crop}", f"train.seed={seed}",
            f"train.val_every={args.val_every}", "train.checkpoint_every=0", "train.image_every=0",
            *overrides(name, args)]
    launch, env, procs = launcher()
    logs = out / "logs"
    # A fresh run directory: the trainer appends to metrics.jsonl and tb/, and an earlier run
    # of the same name (another recipe, when a preset changed) would join the learning curve.
    shutil.rmtree(out / "runs" / run, ignore_errors=True)
    train_s = run_cmd([*launch, "trainer/main.py", "--config", preset, "--no-resume", *over],
                      logs / f"{run}.train.log", env)
    eval_env = {"OMP_NUM_THREADS": str(min(os.cpu_count() or 1, 8))}
    eval_json = out / "eval" / f"{run}.json"
    videos = [v for vids in data["protocols"].values() for v in vids]
    eval_s = run_cmd([sys.executable, "-m", "inference.evaluate", "--model",
                      str(out / "runs" / run),
                      "--videos", *videos, "--json", str(eval_json)],
                     logs / f"{run}.eval.log", eval_env)
    # the same clips with the truth's first frame of each scene given: carried on by a model
    # with colour memory, only pasted in by one without
    keyframe_json = out / "eval" / f"{run}.keyframes.json"
    eval_s += run_cmd([sys.executable, "-m", "inference.evaluate", "--model",
                       str(out / "runs" / run), "--videos", *videos, "--json",
                       str(keyframe_json), "--keyframes", KEYFRAMES],
                      logs / f"{run}.eval_keyframes.log", eval_env)
    strip_s = 0.0
    if seed == 0:  # the strip shows each variant's seed-0 run
        strip_s = run_cmd([sys.executable, "-m", "inference.colorize", "--model",
                           str(out / "runs" / run), "--input", data["strip"], "--output",
                           str(out / "strips" / run), "--overwrite"],
                          logs / f"{run}.strip.log", eval_env)
    return {"variant": name, "seed": seed, "run": run, "preset": preset, "overrides": over,
            "processes": procs, "train_s": train_s, "eval_s": eval_s, "strip_s": strip_s,
            "eval": str(eval_json), "metrics": str(out / "runs" / run / "metrics.jsonl"),
            "eval_keyframes": str(keyframe_json)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.quality",
                                description=(package.__doc__ or "").split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--crop", type=int, default=64, help="training crop side (data.crop_size)")
    p.add_argument("--seeds", type=int, default=2,
                   help=f"seeds of {', '.join(sorted(MULTI_SEED))} (the others: 1)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--val-every", type=int, default=0,
                   help="steps between validations (0: a fifth of --steps)")
    p.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "quality.md")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite --docs from the runs already in --out (results.json)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    for name in ("steps", "crop", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.crop % 8:
        p.error("--crop must be a multiple of 8 (2**model.depth of the presets)")
    args.val_every = args.val_every or max(1, args.steps // 5)
    args.out, args.docs = args.out.resolve(), args.docs.resolve()  # commands run in ROOT
    return args


def git_commit() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.absolute()
    results_path = args.out / "results.json"
    if args.report_only:
        if not results_path.is_file():
            print(f"experiments.quality: error: {results_path}: no results to report; run without "
                  "--report-only first", file=sys.stderr)
            return 1
        saved = json.loads(results_path.read_text())
        for key, value in saved["info"]["budget"].items():  # the runs' budget, not the flags'
            setattr(args, key, value)
        write_report(saved["results"], saved["data"], args, saved["info"], args.docs)
        return 0
    for sub in ("logs", "eval", "strips", "runs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(args.out / "data")
    jobs = [(v, s) for v in args.variants for s in range(args.seeds if v in MULTI_SEED else 1)]
    log(f"{len(jobs)} runs of {args.steps} steps at crop {args.crop}: "
        + ", ".join(f"{v}_s{s}" for v, s in jobs))
    results = []
    for i, (name, seed) in enumerate(jobs, 1):
        t1 = time.perf_counter()
        try:
            r = train_and_score(name, seed, args, data, args.out)
            report = json.loads(Path(r["eval"]).read_text())
            gains = {p: np.mean([v["gain"] for c, v in per_video(report).items()
                                 if protocol_of(data)[c] == p]) for p in data["protocols"]}
            done = ", ".join(f"{p} gain {g:+.2f} dB" for p, g in gains.items())
            log(f"[{i}/{len(jobs)}] {r['run']}: train {r['train_s']:.0f} s, eval "
                f"{r['eval_s'] + r['strip_s']:.0f} s; {done}")
        except RuntimeError as e:  # one failed variant does not lose the others' figures
            r = {"variant": name, "seed": seed, "run": f"{name}_s{seed}", "error": str(e)}
            log(f"[{i}/{len(jobs)}] {name}_s{seed} FAILED: {e}")
        results.append(r)
        left = (time.perf_counter() - t0) / i * (len(jobs) - i)
        log(f"{time.perf_counter() - t1:.0f} s for this run; about {left / 60:.1f} min to go")
    from trainer.config import load_config

    info = {
        "command": "python -m experiments.quality " + shlex.join(argv if argv is not None
                                                                 else sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(),
        "processes": launcher()[2],
        "budget": {k: getattr(args, k) for k in ("steps", "crop", "seeds", "val_every")},
        "batch": load_config(ROOT / DEMO).data.batch_size,
        "wall_s": time.perf_counter() - t0,
        "train_s": sum(r.get("train_s", 0) for r in results),
        "eval_s": sum(r.get("eval_s", 0) + r.get("strip_s", 0) for r in results),
    }
    results_path.write_text(json.dumps({"results": results, "data": data, "info": info},
                                       indent=1))
    try:
        write_report(results, data, args, info, args.docs)
    except RuntimeError as e:  # every run failed: their logs say why
        print(f"experiments.quality: error: {e}; logs in {args.out / 'logs'}", file=sys.stderr)
        return 1
    failed = [r["run"] for r in results if "error" in r]
    log(f"done in {info['wall_s'] / 60:.1f} min" + (f"; FAILED: {', '.join(failed)}"
                                                    if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
