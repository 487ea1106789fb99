"""The worker processes of `python -m bench.step`: each variant built once in a process of its
own (its own Accelerator, its own peak memory), then timed on request, round after round; and
one process that counts FLOPs and measures the device's dense peak before any timing."""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch

from bench.common import peak_rss_mib, reset_peak_rss, rss_mib, sync, torch_device
from bench.step_variants import (
    Group,
    Variant,
    build,
    count_flops,
    dense_peak,
    precisions_available,
)

REFERENCE_PIXELS = 8 * 128 * 128  # --steps counts steps of this many triplet-pixels


# ---------------------------------------------------------------------------------------------
# One variant's worker: built once, then timed on request.


def _peak_memory_mib(device: torch.device, rss0: float | None) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = peak_rss_mib()
    return peak - rss0 if peak is not None and rss0 is not None else None


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _preload() -> None:
    """Import what a build imports, so that the memory baseline holds the libraries."""
    import accelerate  # noqa: F401

    import bench.reference_step  # noqa: F401
    import trainer.step  # noqa: F401
    import trainer.train  # noqa: F401


def _worker(conn, v: Variant, shards: str | None, threads: int, device_name: str,
            n_batches: int) -> None:
    """One variant, built once; answers ("run", steps, reset_peak) with step timings."""
    try:
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.ERROR)
        torch.set_num_threads(threads)
        device = torch_device(device_name)
        _preload()
        rss0 = rss_mib()
        t0 = time.perf_counter()
        step, params = build(v, shards, device, n_batches)
        conn.send(("ready", {"build_s": time.perf_counter() - t0, "params": params}))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, steps, reset = msg
            if reset:
                _reset_peak_memory(device)
            times = []
            for _ in range(steps):
                sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                step()
                sync(device)
                times.append((time.perf_counter() - w0, time.process_time() - c0))
            peak = _peak_memory_mib(device, rss0)
            if device.type == "cuda":  # idle workers of the group keep only their state
                torch.cuda.empty_cache()
            conn.send(("done", times, peak))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# FLOPs and the device's measured peak, counted in one process before any timing.


def _reference_worker(conn, variants: list[Variant], threads: int, device_name: str) -> None:
    try:
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.ERROR)
        torch.set_num_threads(threads)
        device = torch_device(device_name)
        flops = {}
        for v in variants:
            if v.flops_key not in flops:
                flops[v.flops_key] = count_flops(v, device)
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        with torch.no_grad():  # the peaks of the precisions the grid runs on this device
            peaks = {name: dense_peak(device, dtypes[name])
                     for name in precisions_available(device.type)}
        conn.send(("done", flops, peaks))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def spawn(target, *args):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    # Not daemonic: TripletLoader starts DataLoader workers of its own in there.
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    child.close()
    return proc, parent


def flops_and_peaks(variants: list[Variant], args) -> tuple[dict, dict]:
    proc, conn = spawn(_reference_worker, variants, args.threads, args.device)
    msg = conn.recv()
    proc.join()
    if msg[0] == "error":
        raise RuntimeError(f"FLOP count / peak measurement failed:\n{msg[1]}")
    return msg[1], msg[2]


# ---------------------------------------------------------------------------------------------
# Running a group: workers built together, then rounds of interleaved timed runs.


@dataclass
class Run:
    round: int
    label: str
    size: int
    batch: int
    step_s: list[float]  # wall seconds per timed step
    cpu_s: list[float]  # CPU seconds per timed step (the worker process, all threads)

    @property
    def triplets_per_s(self) -> float:
        return self.batch * len(self.step_s) / sum(self.step_s)

    @property
    def cpu_ms_per_triplet(self) -> float:
        return 1000.0 * sum(self.cpu_s) / (self.batch * len(self.cpu_s))


@dataclass
class Worker:
    variant: Variant
    proc: object
    conn: object
    info: dict = field(default_factory=dict)
    warmup_s: list[float] = field(default_factory=list)
    memory_mib: float | None = None
    error: str | None = None


def steps_for(v: Variant, steps: int) -> int:
    return max(1, round(steps * REFERENCE_PIXELS / (v.batch * v.size * v.size)))


def _request(w: Worker, steps: int, reset: bool):
    try:
        w.conn.send(("run", steps, reset))
        msg = w.conn.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        w.proc.join(timeout=10)
        w.error = f"worker died (exit code {w.proc.exitcode}; out of memory?)"
        return None
    if msg[0] == "error":
        w.error = msg[1]
        return None
    _, times, memory = msg
    if memory is not None:
        w.memory_mib = max(memory, w.memory_mib or 0.0)
    return times


def run_group(group: Group, args, shards: str | None, log) -> tuple[list[Run], list[Worker]]:
    # Built all at once (nothing is timed yet), warmed up and timed one at a time.
    workers = []
    for v in group.variants:
        proc, conn = spawn(_worker, v, shards, args.threads, args.device, args.resident)
        workers.append(Worker(v, proc, conn))
    for w in workers:
        try:
            msg = w.conn.recv()
        except EOFError:
            w.proc.join(timeout=10)
            msg = ("error", f"worker died (exit code {w.proc.exitcode}; out of memory?)")
        if msg[0] == "error":
            w.error = msg[1]
            log(f"{w.variant.label}: failed to build\n{w.error}")
        else:
            w.info = msg[1]
    for w in workers:  # warm-up: allocation, oneDNN primitives, compilation
        if w.error:
            continue
        n = args.warmup + (1 if w.variant.compile else 0)
        t0 = time.perf_counter()
        times = _request(w, n, reset=False)
        if times is not None:
            w.warmup_s = [t for t, _ in times]
            log(f"warm-up {w.variant.label}: {', '.join(f'{t:.1f}' for t in w.warmup_s)} s")
        else:
            log(f"{w.variant.label}: failed in warm-up ({time.perf_counter() - t0:.0f} s)\n"
                f"{w.error}")
    runs = []
    for rnd in range(group.rounds):
        for w in workers:
            if w.error:
                continue
            times = _request(w, steps_for(w.variant, args.steps), reset=rnd == 0)
            if times is None:
                log(f"{w.variant.label}: failed\n{w.error}")
                continue
            r = Run(rnd, w.variant.label, group.size, group.batch,
                    [t for t, _ in times], [c for _, c in times])
            runs.append(r)
            log(f"round {rnd + 1}/{group.rounds} {group.size}² b{group.batch} "
                f"{w.variant.label:34s} {r.triplets_per_s:7.2f} triplets/s "
                f"{r.cpu_ms_per_triplet:8.1f} CPU ms/triplet")
    for w in workers:
        if w.proc.is_alive():
            try:
                w.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=30)
        if w.proc.is_alive():
            w.proc.terminate()
    return runs, workers

