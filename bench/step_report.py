"""What `python -m bench.step` prints: the table of medians and paired ratios over rounds, and
with --profile where the time of one step goes, by op category."""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from dataclasses import dataclass

import torch

from bench.common import fmt, median, sync, torch_device
from bench.step_variants import Variant, build, precisions_available
from bench.step_workers import Run, Worker, spawn


@dataclass
class Row:
    size: int
    batch: int
    variant: str
    model: str
    precision: str
    compile: bool
    channels_last: bool
    ngf: int
    ndf: int
    triplets_per_s: float | None  # median over rounds (wall clock)
    triplets_per_s_min: float | None
    triplets_per_s_max: float | None
    cpu_ms_per_triplet: float | None  # median over rounds
    vs_seed_wall: float | None  # median over rounds of (this rate / seed's rate, same round)
    vs_seed_cpu: float | None  # seed's CPU ms per triplet / this one's, paired too
    memory_mib: float | None
    gflop_per_triplet: float | None
    achieved_gflops: float | None
    mfu: float | None  # achieved / measured dense peak (bf16 where the device has it, else fp32)
    first_step_s: float | None  # first warm-up step (includes compilation)
    params_m: float | None
    note: str = ""


def mfu_peak(peaks: dict) -> tuple[str, float]:
    """The precision MFU is measured against, and its peak FLOP/s: bf16 where the device has
    it natively, else fp32."""
    name = "bf16" if "bf16" in peaks else "fp32"
    return name, peaks[name]["peak"]


def summarize(runs: list[Run], workers: list[Worker], flops: dict, peaks: dict,
              args) -> list[Row]:
    by_label: dict[tuple[int, int, str], list[Run]] = {}
    for r in runs:
        by_label.setdefault((r.size, r.batch, r.label), []).append(r)
    rows = []
    for w in workers:
        v = w.variant
        mine = by_label.get((v.size, v.batch, v.label), [])
        # the 3-frame GAN's step as published, paired by round
        ref = {r.round: r for r in by_label.get((v.size, v.batch, "seed (as published)"), [])}
        wall = [r.triplets_per_s / ref[r.round].triplets_per_s for r in mine if r.round in ref]
        cpu = [ref[r.round].cpu_ms_per_triplet / r.cpu_ms_per_triplet
               for r in mine if r.round in ref]
        tps = median(r.triplets_per_s for r in mine)
        cpu_ms = median(r.cpu_ms_per_triplet for r in mine)
        f = flops.get(v.flops_key)
        achieved = None
        if f is not None and mine:
            if args.device == "cuda":
                achieved = f * tps
            else:  # per CPU-second, times the threads the peak was measured with
                achieved = f / (cpu_ms / 1000.0) * args.threads
        note = ""
        if w.error:
            last = w.error.strip().splitlines()[-1][:160]
            note = f"not measured: {last}"
        rows.append(Row(
            v.size, v.batch, v.label, v.model, v.precision, v.compile, v.channels_last, v.ngf,
            v.ndf, tps, min((r.triplets_per_s for r in mine), default=None),
            max((r.triplets_per_s for r in mine), default=None), cpu_ms, median(wall),
            median(cpu), w.memory_mib, f / 1e9 if f is not None else None,
            achieved / 1e9 if achieved is not None else None,
            achieved / mfu_peak(peaks)[1] if achieved is not None else None,
            w.warmup_s[0] if w.warmup_s else None,
            w.info["params"] / 1e6 if "params" in w.info else None, note,
        ))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| size | batch | variant | triplets/s | (min-max) | CPU ms/triplet | vs seed (wall) "
        "| vs seed (CPU) | memory MiB | GFLOP/triplet | GFLOP/s | MFU | first step s |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.size} | {r.batch} | {r.variant} | {r.note} "
                         "| | | | | | | | | |")
            continue
        span = (f"({r.triplets_per_s_min:.2f}-{r.triplets_per_s_max:.2f})"
                if r.triplets_per_s_min is not None else "-")
        lines.append(
            f"| {r.size} | {r.batch} | {r.variant} | {fmt(r.triplets_per_s)} | {span} | "
            f"{fmt(r.cpu_ms_per_triplet, '.0f')} | {fmt(r.vs_seed_wall, '.2f', 'x')} | "
            f"{fmt(r.vs_seed_cpu, '.2f', 'x')} | {fmt(r.memory_mib, '.0f')} | "
            f"{fmt(r.gflop_per_triplet, '.1f')} | {fmt(r.achieved_gflops, '.0f')} | "
            f"{fmt(None if r.mfu is None else 100 * r.mfu, '.1f', '%')} | "
            f"{fmt(r.first_step_s, '.1f')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --profile: where the time of one step goes (torch.profiler), per op category.

CATEGORIES = (  # first match wins, on the aten op name
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("convolution", "conv2d", "conv_transpose")),
    ("normalization", ("batch_norm", "group_norm", "instance_norm")),
    ("optimizer (Adam) + EMA", ("_foreach", "adam", "lerp")),
    ("activations", ("leaky_relu", "relu", "tanh", "sigmoid", "threshold")),
    ("copies / layout / cat", ("copy_", "cat", "clone", "contiguous", "to_dense", "reorder",
                               "as_strided", "index", "upsample", "interpolate")),
    ("spectral norm (mv, dot)", ("mv", "dot", "linalg", "norm")),
)


def _category(name: str) -> str:
    op = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in op for k in keys):
            return cat
    return "other (elementwise, losses, autograd)"


def _profile_worker(conn, v: Variant, shards, threads: int, device_name: str) -> None:
    try:
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.ERROR)
        torch.set_num_threads(threads)
        device = torch_device(device_name)
        step, _ = build(v, shards, device, 1)
        for _ in range(2 if v.compile else 1):
            step()
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            step()
            sync(device)
        averages = prof.key_averages()
        cuda = device.type == "cuda"
        totals: dict[str, float] = {}
        for evt in averages:
            us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
            totals[_category(evt.key)] = totals.get(_category(evt.key), 0.0) + us / 1000.0
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        conn.send(("done", totals, averages.table(sort_by=sort, row_limit=12)))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def profile_variants(args, shards) -> list[dict]:
    size, batch = args.sizes[0], args.batches[0]
    variants = [Variant("ours", size, batch, prec, False, True)
                for prec in precisions_available(args.device) if prec != "fp16"]
    variants.append(Variant("seed", size, batch))
    if args.device == "cuda":
        variants.insert(2, Variant("ours", size, batch, "bf16", True, True))
    results = []
    for v in variants:
        proc, conn = spawn(_profile_worker, v, shards, args.threads, args.device)
        msg = conn.recv()
        proc.join()
        if msg[0] == "error":
            print(f"{v.label}: profiling failed\n{msg[1]}", file=sys.stderr)
            continue
        totals, top = msg[1], msg[2]
        whole = sum(totals.values())
        print(f"\n## {v.label}, {size}², batch {batch}: {whole:.0f} ms of "
              f"{'GPU' if args.device == 'cuda' else 'CPU'} time in one step (self time by "
              "op category)")
        print("| category | ms | share |\n| --- | ---: | ---: |")
        for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"| {cat} | {ms:.0f} | {100 * ms / whole:.1f}% |")
        if args.verbose:
            print(top)
        results.append({"variant": v.label, "size": size, "batch": batch, "ms": totals})
    return results

