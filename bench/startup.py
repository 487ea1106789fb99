"""Start-up time of the data loaders against the number of shards.

    python -m bench.startup [--shards 10 1000] [--samples-per-shard 2] [--rounds 3]
                            [--code before=/tmp/before] [--json PATH] [--keep DIR]

What each rank does before its first step: construct the train and the val `TripletLoader`
(world size 1, `data.backend=dali`, on the CPU), which decides which samples it may read,
and then build their DALI pipelines (`loader._make_source()`: the per-rank indexes written,
the reader's metadata parsed, the tars opened). Per shard count the bench builds one data set
of tiny frames (64x32; `--samples-per-shard` triplets per shard, half of the shards train and
half val: two one-scene videos split by video) with this checkout's `tricolor-shards build`,
which writes `good-samples.json` beside the manifest.

Variants, each timed in a fresh process (`--rounds` times, medians):

- `after`: this checkout, reading `good-samples.json`;
- `after, no index`: this checkout with the index moved away: the fallback scan of every shard
  (what a data set built before the index gets, until `tricolor-shards verify` writes it);
- any `--code LABEL=DIR`: another checkout's `trainer` (e.g. a `git worktree` of an older
  commit) imported through PYTHONPATH, on the same shards (it ignores the index).

Per variant: `first start` (an empty verified-shards cache, as on a fresh node: every frame's
CRC-32 is checked by the scan), `restart` (the same process again: the cache remembers the
verified shards, as at a requeue on the same node) and `pipelines` (both DALI pipelines
built, after the first start). The shards were just written, so they are in the page cache:
a cold parallel filesystem makes the scan (not the index) slower still.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import fmt, machine, median

REPO = Path(__file__).resolve().parent.parent
INDEX = "good-samples.json"  # trainer.data.samples.GOOD_SAMPLES (not imported: older code)

# Run in a child process, with the code under test first on sys.path.
CHILD = r"""
import json, logging, sys, time
logging.disable(logging.WARNING)
import torch
from trainer.config import load_config
from trainer.data import TripletLoader
shards = sys.argv[1]
cfg = load_config(None, [f"data.shards={shards}", "data.crop_size=32", "data.batch_size=1",
                         "data.num_threads=1", "data.backend=dali"]).data

def construct():
    t = time.perf_counter()
    loaders = [TripletLoader(cfg, "grey", split, 0, 1, torch.device("cpu"), seed=0,
                             shuffle=split == "train", augment=split == "train")
               for split in ("train", "val")]
    return time.perf_counter() - t, loaders

first, loaders = construct()
t = time.perf_counter()
sources = [loader._make_source() for loader in loaders]
pipelines = time.perf_counter() - t
restart, _ = construct()
print(json.dumps({"first": first, "restart": restart, "pipelines": pipelines,
                  "samples": sum(len(loader.samples) for loader in loaders),
                  "module": sys.modules["trainer.data"].__file__}))
"""


def build_shards(out: Path, shards: int, per_shard: int) -> Path:
    from shards.cli import main as shards_main
    from tests.videos import scene_video

    out.mkdir(parents=True, exist_ok=True)
    frames = shards // 2 * per_shard + 2  # one triplet per frame but the first and last
    videos = [scene_video(out / f"v{i}.mp4", [frames], width=64, height=32) for i in range(2)]
    data = out / "shards"
    code = shards_main(["build", *map(str, videos), "--out", str(data), "--short-side", "32",
                        "--split-by", "video", "--val-fraction", "0.5", "--seed", "1",
                        "--samples-per-shard", str(per_shard)])
    if code != 0:
        raise SystemExit(f"building {shards} shards failed")
    return data


def run_child(code_dir: Path, shards: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="startup-cache-") as cache:
        env["XDG_CACHE_HOME"] = cache  # a fresh node: nothing remembered as verified
        out = subprocess.run([sys.executable, "-c", CHILD, str(shards)], env=env,
                             capture_output=True, text=True, cwd=code_dir)
    if out.returncode != 0:
        raise SystemExit(f"{code_dir}: the child failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["module"]).resolve().is_relative_to(code_dir.resolve()):
        raise SystemExit(f"the child imported {result['module']}, not the code in {code_dir}")
    return result


def measure(variants: dict[str, Path], data: Path, rounds: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, so that load from other processes hits all alike
        for name, code_dir in variants.items():
            moved = data.parent / INDEX
            if name == "after, no index":
                (data / INDEX).rename(moved)
            try:
                runs[name].append(run_child(code_dir, data))
            finally:
                if moved.exists():
                    moved.rename(data / INDEX)
    return {name: {key: median(r[key] for r in rs) for key in ("first", "restart", "pipelines")}
            | {"samples": rs[0]["samples"]} for name, rs in runs.items()}


def table(results: list[dict]) -> str:
    lines = ["| shards | samples | variant | first start, s | restart, s | pipelines, s |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in results:
        for name, m in r["variants"].items():
            lines.append(f"| {r['shards']} | {m['samples']} | {name} | {fmt(m['first'], '.3f')} "
                         f"| {fmt(m['restart'], '.3f')} | {fmt(m['pipelines'], '.3f')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.startup",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[10, 1000],
                   help="shard counts (train + val, half each)")
    p.add_argument("--samples-per-shard", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="runs per variant, interleaved")
    p.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                   help="also time another checkout's trainer (e.g. before=/tmp/before)")
    p.add_argument("--keep", type=Path, help="build the shards here and keep them")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = {}
    for item in args.code:
        label, _, directory = item.partition("=")
        variants[label] = Path(directory).resolve()
    variants |= {"after": REPO, "after, no index": REPO}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for count in args.shards:
            work = (args.keep or Path(tmp)) / f"n{count}"
            t = time.perf_counter()
            data = build_shards(work, count, args.samples_per_shard)
            built = time.perf_counter() - t
            results.append({"shards": count, "build_s": built,
                            "variants": measure(variants, data, args.rounds)})
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
            "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
