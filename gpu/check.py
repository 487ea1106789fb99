"""`make gpu-check`: one command that says whether the GPU path works and how fast it is.

    python -m gpu.check run [--out bench_out] [--wheels .gpu-wheels] [--budget 480]
                            [--only env,dali,...]

`run` on a host without CUDA prints one line and exits 2, touching nothing. With CUDA: installs
the carried wheels (tools/wheels.py: `install`), then runs the stages of gpu/stages.py, each in
its own process under its own time limit, inside one overall budget (8 minutes), going on
after a failed stage; writes <out>/gpu_check.md, gpu_check.json and gpu_check.log; exits 1
when a stage failed or ran out of time, 0 otherwise (a stage skipped for a package the host
lacks is reported as skipped, not as passed). docs/gpu-check.md: stages, how to run, the
carry plan; the wheels are packed on the CPU side by `make gpu-wheels` (tools/wheels.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.wheels import carry_folders, install

ROOT = Path(__file__).resolve().parent.parent
INSTALL_BUDGET_S = 60  # + the stages' budgets = 480 s (gpu/stages.py: STAGES)
TOTAL_BUDGET_S = 480


# ---------------------------------------------------------------------------------------------
# The report.


def exit_status(results: list[dict]) -> int:
    return 1 if any(r["status"] in ("fail", "timeout") for r in results) else 0


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def flat(figures: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in figures.items():
        if isinstance(v, dict) and v and len(json.dumps(v, default=str)) > 80:
            out += flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def write_report(out: Path, environment: dict, install_status: dict, results: list[dict],
                 total_s: float) -> tuple[Path, Path]:
    """<out>/gpu_check.md and gpu_check.json: the environment, the wheel sets, and every
    stage's status, duration, reason, checks and figures."""
    out.mkdir(parents=True, exist_ok=True)
    status = exit_status(results)
    data = {"created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "exit_status": status, "total_s": round(total_s, 1),
            "environment": environment, "wheel_sets": install_status, "stages": results}
    js = out / "gpu_check.json"
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    lines = [f"# gpu-check, {data['created']}", "",
             f"{'FAILED' if status else 'passed'}: "
             + ", ".join(f"{n} {sum(r['status'] == n for r in results)}"
                         for n in ("pass", "fail", "timeout", "skip"))
             + f"; {total_s:.0f} s in all.", "", "## Environment", "",
             "| | |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in environment.items()]
    lines += [f"| wheel set {_cell(k)} | {_cell(v)} |" for k, v in install_status.items()]
    lines += ["", "## Stages", "", "| stage | status | seconds | limit | reason |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['duration_s']:.1f} | {r['budget_s']} | "
              f"{_cell(r.get('reason', ''))} |" for r in results]
    for r in results:
        lines += ["", f"### {r['name']}: {r['status']}", ""]
        if r.get("checks"):
            lines += [f"- {'ok' if c['ok'] else 'FAIL'}: {c['name']}"
                      + (f" ({c['detail']})" if c["detail"] else "") for c in r["checks"]]
            lines.append("")
        if r.get("figures"):
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in flat(r["figures"])]
        if r["status"] in ("fail", "timeout") and r.get("log_tail"):
            lines += ["", "```", *r["log_tail"][-30:], "```"]
    md = out / "gpu_check.md"
    md.write_text("\n".join(lines) + "\n")
    return md, js


# ---------------------------------------------------------------------------------------------
# make gpu-check.


def cuda_or_none() -> str | None:
    """None when CUDA works here, else why not (one line)."""
    try:
        import torch
    except Exception as e:  # no torch at all
        return f"no torch ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    return None


def run_stage_process(name: str, budget: float, args, env: dict, log) -> dict:
    from gpu.stages import BY_NAME

    result_file = args.work / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "gpu.stages", name, "--work", str(args.work / name),
            "--shards", str(args.shards), "--result", str(result_file)]
    if args.cpu_rehearsal:
        argv += ["--device", "cpu", "--tiny"]
    t0 = time.perf_counter()
    timed_out = False
    with open(args.work / f"{name}.log", "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            import signal

            os.killpg(proc.pid, signal.SIGKILL)  # the stage and what it launched
            rc = proc.wait()
    duration = time.perf_counter() - t0
    text = (args.work / f"{name}.log").read_text(errors="replace")
    log(f"===== {name} ({duration:.1f} s, rc {rc})\n{text}")
    result = {"name": name, "budget_s": BY_NAME[name].budget_s, "duration_s": duration}
    if result_file.is_file() and not timed_out:
        result |= json.loads(result_file.read_text())
    else:
        result |= {"status": "timeout" if timed_out else "fail", "figures": {}, "checks": [],
                   "reason": f"ran past its {budget:.0f} s limit" if timed_out
                   else f"the stage process died (rc {rc}) before writing its result"}
    result["log_tail"] = text.splitlines()[-40:]
    return result


def run_main(args) -> int:
    why = None if args.cpu_rehearsal else cuda_or_none()
    if why is not None:
        print(f"gpu-check: {why} here; nothing was run (it needs a CUDA GPU host)")
        return 2
    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "gpu_check.log", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    site = args.work / "site"
    install_status = (install(args.wheels, site, log, timeout_s=INSTALL_BUDGET_S)
                      if not args.no_install else {})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("ACCELERATE_USE_CPU", None)
    if args.shards is None:
        found = [f / "shards" for f in carry_folders(args.wheels) if (f / "shards").is_dir()]
        args.shards = found[0] if found else args.wheels / "base" / "shards"
    from gpu.stages import STAGES

    only = set(args.only.split(",")) if args.only else None
    results = []
    for stage in STAGES:
        if only and stage.name not in only:
            continue
        left = args.budget - (time.perf_counter() - began)
        need = stage.budget_s if stage.optional else stage.budget_s / 2
        if left < need:
            results.append({"name": stage.name, "budget_s": stage.budget_s, "duration_s": 0.0,
                            "status": "skip", "figures": {}, "checks": [],
                            "reason": f"{left:.0f} s of the {args.budget:.0f} s budget left"})
            log(f"===== {stage.name}: skipped, {left:.0f} s left")
            continue
        results.append(run_stage_process(stage.name, min(stage.budget_s, left), args, env, log))
        log(f"----- {stage.name}: {results[-1]['status']} {results[-1].get('reason', '')}")
    environment = next((r["figures"] for r in results if r["name"] == "env" and r["figures"]),
                       {"note": "the env stage did not report"})
    md, js = write_report(args.out, environment, install_status, results,
                          time.perf_counter() - began)
    log(md.read_text())
    log(f"report: {md} and {js}")
    log_file.close()
    return exit_status(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu.check",
                                description=(__doc__ or "").split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the check (a CUDA host)")
    r.add_argument("--out", type=Path, default=Path("bench_out"))
    r.add_argument("--work", type=Path, default=Path("/tmp/tricolor-gpu-check"))
    r.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    r.add_argument("--shards", type=Path, help="default: the carried .gpu-wheels/base/shards")
    r.add_argument("--budget", type=float, default=TOTAL_BUDGET_S,
                   help="seconds for everything, the install included")
    r.add_argument("--only", help="comma-separated stage names")
    r.add_argument("--no-install", action="store_true")
    r.add_argument("--cpu-rehearsal", action="store_true",
                   help="tests only: run the stages on the CPU at tiny shapes (no CUDA check)")
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.out = args.out.resolve()
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
