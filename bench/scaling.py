"""Data-parallel scaling of the training step: 1 process vs 2 processes on this machine.

    python -m bench.scaling [--size 128] [--batch-size 8] [--ngf 64] [--ndf 32]
                            [--precision fp32|bf16] [--layouts 1x1 2x1 1x2] [--rounds 2]
                            [--steps 3] [--json PATH]

Each layout `PxT` is one `accelerate launch` of P processes with T torch threads each
(OMP_NUM_THREADS=T), the way the trainer runs on CPU hosts (tests/launching.py):
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2` (gloo), or `--cpu`
for one process. Every rank builds the trainer's GAN (`trainer.launch.make_accelerator`,
`trainer.train.build_gan`: DDP over gloo with 2 processes) and runs `trainer.step.train_step`
on its own resident synthetic batch of `--batch-size` triplets (the per-process batch is
fixed: weak scaling, as in multi-GPU training). After `--warmup` steps, the ranks meet at a
barrier, run `--steps` timed steps, and meet again; the wall time between the barriers on rank
0 gives the rate, triplets/s = P x batch x steps / wall.

    efficiency = rate(2x1) / (2 x rate(1x1))

The fair comparison on 2 cores is 2 processes with one thread each against 1 process with one
thread (each process gets a core of its own; a second thread per process would oversubscribe
the cores). `1x2`, one process with two threads, is what the same 2 cores give without data
parallelism, for reference. Layouts take turns, `--rounds` times; medians are reported. On a
host shared with other processes a busy core slows the 2-process run more than the 1-process
one, so the CPU-time efficiency is reported too: CPU seconds per triplet, all threads (gloo's
included) of all ranks, 1x1 over 2x1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import fmt, machine, median

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# One rank (run under accelerate launch with --rank-worker).


def rank_main(args) -> int:
    import torch

    from trainer.config import load_config
    from trainer.data import Batch
    from trainer.launch import make_accelerator
    from trainer.step import train_step
    from trainer.train import build_gan

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [
        "data.shards=unused", f"data.crop_size={args.size}", f"data.batch_size={args.batch_size}",
        "model.mode=grey", f"model.ngf={args.ngf}", f"model.ndf={args.ndf}", "model.depth=5",
        f"model.norm={args.norm}", "model.d_head=patch", "loss.adversarial=lsgan",
        "loss.lambda_pixel=20.0", "optim.lr_g=1e-3", "optim.lr_d=1e-3",
    ])
    accelerator = make_accelerator(cfg, "no" if args.precision == "fp32" else args.precision)
    world = int(os.environ.get("WORLD_SIZE", 1))
    assert accelerator.num_processes == world, (accelerator.num_processes, world)
    torch.manual_seed(0)
    gan = build_gan(cfg, accelerator)
    g = torch.Generator().manual_seed(1 + accelerator.process_index)
    b, s = args.batch_size, args.size
    batch = Batch((torch.rand(b, 3, 1, s, s, generator=g) * 2 - 1).to(accelerator.device),
                  (torch.rand(b, 3, 2, s, s, generator=g) * 2 - 1).to(accelerator.device), [])
    for _ in range(args.warmup):
        train_step(accelerator, gan, batch)
    accelerator.wait_for_everyone()
    t0, c0 = time.perf_counter(), time.process_time()
    steps = []
    for _ in range(args.steps):
        t = time.perf_counter()
        train_step(accelerator, gan, batch)
        steps.append(time.perf_counter() - t)
    accelerator.wait_for_everyone()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    import torch.distributed as dist

    mine = {"rank": accelerator.process_index, "wall_s": wall, "cpu_s": cpu, "step_s": steps}
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps({"world": world, "ranks": ranks}))
    accelerator.wait_for_everyone()
    return 0


# ---------------------------------------------------------------------------------------------
# The driver: launches, rounds, summary.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, threads: int, args, out: Path) -> subprocess.CompletedProcess:
    mode = "--multi_gpu" if processes > 1 else "--cpu"  # --multi_gpu needs 2+ processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", mode,
           "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "bench.scaling", "--rank-worker", "--out", str(out),
           "--threads", str(threads), "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--ngf", str(args.ngf), "--ndf", str(args.ndf),
           "--norm", args.norm, "--precision", args.precision,
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=args.timeout)


@dataclass
class Run:
    round: int
    layout: str
    processes: int
    threads: int
    triplets_per_s: float  # all ranks together, wall clock on rank 0 between the barriers
    cpu_ms_per_triplet: float  # CPU time of all ranks (all threads) per triplet
    step_s_median: float  # rank 0's median step time
    launch_s: float  # the whole launch: start-up, build, warm-up, timed steps


def measure(rnd: int, layout: str, args, tmp: Path) -> Run:
    processes, threads = (int(x) for x in layout.split("x"))
    out = tmp / f"{layout}-{rnd}.json"
    t0 = time.perf_counter()
    proc = launch(processes, threads, args, out)
    launch_s = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"{layout}: launch failed (exit {proc.returncode})\n{tail}")
    result = json.loads(out.read_text())
    ranks = result["ranks"]
    wall = ranks[0]["wall_s"]
    n = processes * args.batch_size * args.steps
    return Run(rnd, layout, processes, threads, n / wall,
               1000.0 * sum(r["cpu_s"] for r in ranks) / n,
               statistics.median(ranks[0]["step_s"]), launch_s)


def summarize(runs: list[Run]) -> tuple[list[dict], dict]:
    layouts = list(dict.fromkeys(r.layout for r in runs))
    rows = []
    for layout in layouts:
        v = [r for r in runs if r.layout == layout]
        rows.append({
            "layout": layout, "processes": v[0].processes, "threads": v[0].threads,
            "triplets_per_s": median(r.triplets_per_s for r in v),
            "triplets_per_s_min": min(r.triplets_per_s for r in v),
            "triplets_per_s_max": max(r.triplets_per_s for r in v),
            "cpu_ms_per_triplet": median(r.cpu_ms_per_triplet for r in v),
            "step_s": median(r.step_s_median for r in v),
        })
    # efficiencies paired within a round: the two launches ran back to back
    one = {r.round: r for r in runs if r.layout == "1x1"}
    two = {r.round: r for r in runs if r.layout == "2x1"}
    rounds = sorted(set(one) & set(two))
    eff = {
        "wall": median(two[k].triplets_per_s / (2 * one[k].triplets_per_s) for k in rounds),
        "cpu": median(one[k].cpu_ms_per_triplet / two[k].cpu_ms_per_triplet for k in rounds),
        "per_round_wall": [two[k].triplets_per_s / (2 * one[k].triplets_per_s) for k in rounds],
    }
    return rows, eff


def table(rows: list[dict], eff: dict) -> str:
    lines = ["| layout | processes x threads | triplets/s | (min-max) | step s (rank 0) "
             "| CPU ms/triplet |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['processes']} x {r['threads']} | {r['triplets_per_s']:.2f} | "
            f"({r['triplets_per_s_min']:.2f}-{r['triplets_per_s_max']:.2f}) | "
            f"{r['step_s']:.2f} | {r['cpu_ms_per_triplet']:.0f} |")
    lines.append("")
    def pct(x: float | None) -> str:
        return fmt(None if x is None else 100 * x, ".1f", "%")

    per_round = ", ".join(pct(e) for e in eff["per_round_wall"])
    lines.append(f"efficiency 2x1 vs 2 x 1x1: wall {pct(eff['wall'])} (per round: {per_round}); "
                 f"CPU time {pct(eff['cpu'])}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling",
                                description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="triplets per process per step")
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--norm", default="batch", choices=("batch", "group", "instance"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"],
                   help="PxT: P processes with T torch threads each; 1x1 and 2x1 are needed "
                        "for the efficiency")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    p.add_argument("--json", type=Path)
    # internal: one rank of a launch
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rank_worker:
        return rank_main(args)
    info = machine()
    began = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tricolor-bench-scaling-") as tmp:
        for rnd in range(args.rounds):
            for layout in args.layouts:
                r = measure(rnd, layout, args, Path(tmp))
                runs.append(r)
                print(f"round {rnd + 1}/{args.rounds} {layout}: {r.triplets_per_s:.2f} "
                      f"triplets/s, {r.cpu_ms_per_triplet:.0f} CPU ms/triplet, step "
                      f"{r.step_s_median:.2f} s (launch {r.launch_s:.0f} s)", file=sys.stderr,
                      flush=True)
    rows, eff = summarize(runs)
    info["loadavg_after"] = os.getloadavg()
    print(f"# {info['cpus']} CPUs ({info['cpu_model']}); {args.size}², batch {args.batch_size} "
          f"per process, ngf {args.ngf}, ndf {args.ndf}, norm {args.norm}, {args.precision}; "
          f"gloo; {args.warmup} warm-up + {args.steps} timed steps per launch, median of "
          f"{args.rounds} interleaved rounds; load average {info['loadavg'][0]:.2f} before, "
          f"{info['loadavg_after'][0]:.2f} after; {time.perf_counter() - began:.0f} s")
    print(table(rows, eff))
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info, "rows": rows, "efficiency": eff,
            "runs": [asdict(r) for r in runs],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
