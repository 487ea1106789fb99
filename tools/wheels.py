"""Wheels for `make gpu-check`'s GPU host, which has no package index: packed here, installed there.

Downloaded and packed into carry folders on this side, joined, checked and installed there.

    python -m tools.wheels pack [--dest .gpu-wheels]      # on the CPU side: make gpu-wheels
    python -m tools.wheels install [--wheels .gpu-wheels] # GPU host: join, verify, pip install
    python -m tools.wheels stash [--wheels .gpu-wheels]   # GPU host: keep a carried folder

`pack` downloads (cp312, manylinux x86_64, --no-deps, pinned to the versions installed in this
venv) every wheel the GPU host lacks, builds the deepspeed wheel from its sdist, builds the
stage shards (gpu/shards.py), splits files over 50 MB into parts, and packs the lot into carry
folders of at most --cap MiB each (the device tool carries 64 MiB a call, working tree
included), each holding a copy of manifest.json (sha256 of every whole file and part).
`install` is what `python -m gpu.check run` does first; `stash` moves carried folders out of
the working tree between calls of a multi-call carry (docs/gpu-check.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shards.tario import sha256_file

ROOT = Path(__file__).resolve().parent.parent
PART_BYTES = 50_000_000  # files larger than this travel as parts (`split -b 50000000`)
MANIFEST = "manifest.json"
STASH = Path(os.environ.get("TRICOLOR_GPU_STASH", "/tmp/tricolor-gpu-wheels"))

# What the GPU host lacks, by set (against its image's package list, HOST_PACKAGES below).
# Versions: those installed in this venv (what the tests here ran with). A set is installed
# there only whole.
WHEEL_SETS = {
    "core": ["kornia", "kornia_rs", "omegaconf", "webdataset", "braceexpand"],
    "deepspeed": ["deepspeed", "hjson", "pydantic", "pydantic_core", "annotated-types",
                  "typing-inspection", "typing-extensions"],
    "dali": ["nvidia-dali-cuda130", "nvidia-nvimgcodec-cu13", "nvidia-libnvcomp-cu13",
             "nvidia-nvjpeg", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13", "astunparse",
             "gast", "optree", "nvtx", "makefun", "libcst"],
    # not needed by the check (its shards are built here): video decoding, tricolor-shards
    "av": ["av", "scenedetect-headless", "platformdirs"],
}
SDIST_ONLY = {"deepspeed"}  # built here with `pip wheel --no-deps`
# The GPU host image's installed packages, normalized names: requirements met there.
HOST_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
wheel wrapt xarray xxhash yarl zipp
""".split())
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# ---------------------------------------------------------------------------------------------
# Split, join, manifest.


def split_file(path: Path, out_dir: Path, part_bytes: int = PART_BYTES) -> list[dict]:
    """`path` -> out_dir/<name>.part000, .part001, ... of `part_bytes` each (the last
    shorter), as `split -b` cuts; returns [{"name", "bytes", "sha256"}] in order."""
    parts = []
    with open(path, "rb") as f:
        for i in range(10**6):
            data = f.read(part_bytes)
            if not data:
                break
            part = out_dir / f"{path.name}.part{i:03d}"
            part.write_bytes(data)
            parts.append({"name": part.name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    return parts


def join_parts(entry: dict, search: list[Path], dest: Path) -> Path:
    """The whole file of a manifest entry in `dest`: copied, or joined from its parts found
    in the `search` folders; its sha256 checked. Raises FileNotFoundError (a piece is
    missing) or ValueError (a checksum differs)."""
    def find(name: str) -> Path:
        for folder in search:
            if (folder / name).is_file():
                return folder / name
        raise FileNotFoundError(f"{name} is in none of {', '.join(map(str, search))}")

    out = dest / entry["name"]
    pieces = [p["name"] for p in entry["parts"]] if entry.get("parts") else [entry["name"]]
    tmp = out.with_name(out.name + ".joining")
    with open(tmp, "wb") as f:
        for name in pieces:
            with open(find(name), "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    digest = sha256_file(tmp)
    if digest != entry["sha256"]:
        tmp.unlink()
        raise ValueError(f"{entry['name']}: sha256 {digest[:12]}... differs from the "
                         f"manifest's {entry['sha256'][:12]}...")
    tmp.replace(out)
    return out


def pack(items: list[tuple[str, int]], cap: int) -> list[list[str]]:
    """Names with sizes -> bins of at most `cap` bytes (first fit, largest first)."""
    bins: list[tuple[int, list[str]]] = []
    for name, size in sorted(items, key=lambda x: -x[1]):
        if size > cap:
            raise ValueError(f"{name}: {size} bytes do not fit in a carry of {cap}")
        for i, (used, names) in enumerate(bins):
            if used + size <= cap:
                bins[i] = (used + size, [*names, name])
                break
        else:
            bins.append((size, [name]))
    return [names for _, names in bins]


# ---------------------------------------------------------------------------------------------
# make gpu-wheels (CPU side): `pack`.


def requirements(wheel: Path) -> list[tuple[str, str]]:
    """(normalized name, requirement) of a wheel's Requires-Dist that apply to CPython 3.12
    on Linux x86_64 without extras."""
    import zipfile

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    envir = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3",
                                      "sys_platform": "linux", "platform_machine": "x86_64",
                                      "implementation_name": "cpython",
                                      "platform_python_implementation": "CPython",
                                      "platform_system": "Linux", "os_name": "posix",
                                      "extra": ""}
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(envir):
                out.append((normalize(req.name), str(req)))
    return out


def unmet(wheels: list[Path]) -> list[str]:
    """Requirements of these wheels that neither they nor the GPU host's image provide."""
    have = HOST_PACKAGES | {normalize(w.name.split("-")[0]) for w in wheels}
    missing = []
    for w in wheels:
        for name, req in requirements(w):
            if name not in have:
                missing.append(f"{w.name}: {req}")
    return missing


def pinned(name: str) -> str:
    import importlib.metadata

    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def download(dest: Path, sets: list[str]) -> dict[str, list[Path]]:
    """Wheels of `sets` into dest/<set>/ (pip download, cp312 manylinux x86_64, no deps)."""
    got = {}
    for s in sets:
        folder = dest / s
        folder.mkdir(parents=True, exist_ok=True)
        binary = [pinned(n) for n in WHEEL_SETS[s] if n not in SDIST_ONLY]
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        if binary:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary=:all:", "--python-version", "3.12",
                            "--implementation", "cp", *plat, "-d", str(folder), *binary],
                           check=True)
        for name in WHEEL_SETS[s]:
            if name in SDIST_ONLY and not list(folder.glob(f"{name}-*.whl")):
                env = dict(os.environ, DS_BUILD_OPS="0")
                subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                                "--no-build-isolation", "-w", str(folder), pinned(name)],
                               check=True, env=env)
        got[s] = sorted(folder.glob("*.whl"))
    return got


def pack_main(args) -> int:
    dest: Path = args.dest
    stage = dest / "download"  # whole wheels, by set (kept: a rerun downloads nothing new)
    got = download(stage, args.sets)
    every = [w for ws in got.values() for w in ws]
    missing = unmet(every)
    for line in missing:
        print(f"unmet requirement (neither carried nor on the GPU host): {line}",
              file=sys.stderr)
    print("building the stage shards", file=sys.stderr)
    from gpu.shards import build_stage_shards

    shards = dest / "shards-build"
    shard_bytes = build_stage_shards(shards)
    # Carry folders: base = every other set, plus the shards (one call); dali-N = DALI and
    # its dependencies, av-N = the av set, in parts, each folder at most --cap MiB.
    for old in dest.glob("*"):
        if old.name not in ("download", "shards-build"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    cap = int(args.cap * 2**20)
    entries = []
    split: dict[str, list[tuple[str, int]]] = {"dali": [], "av": []}  # pieces of <set>-N
    base, parts_tmp = dest / "base", dest / "parts-tmp"
    base.mkdir()
    shutil.copytree(shards, base / "shards")
    for s, wheels in got.items():
        for w in wheels:
            entry = {"name": w.name, "set": s, "bytes": w.stat().st_size,
                     "sha256": sha256_file(w), "parts": []}
            entries.append(entry)
            target = parts_tmp if s in split else base
            target.mkdir(exist_ok=True)
            if w.stat().st_size > PART_BYTES:
                entry["parts"] = split_file(w, target)
                pieces = [(p["name"], p["bytes"]) for p in entry["parts"]]
            else:
                shutil.copy2(w, target / w.name)
                pieces = [(w.name, w.stat().st_size)]
            if s in split:
                split[s] += pieces
    folders = {"base": base}
    for s, items in split.items():
        for i, names in enumerate(pack(items, cap), 1):
            folder = dest / f"{s}-{i}"
            folder.mkdir()
            for n in names:
                (parts_tmp / n).rename(folder / n)
            folders[folder.name] = folder
    shutil.rmtree(parts_tmp, ignore_errors=True)
    sizes = {name: sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
             for name, f in folders.items()}
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "part_bytes": PART_BYTES, "files": entries, "folders": sizes,
                "shards_bytes": shard_bytes, "unmet": missing}
    for f in folders.values():
        (f / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    mib = 2**20
    print(f"{'folder':<10} {'MiB':>8}  (carry each in one device call; cap {args.cap} MiB)")
    for name, size in sizes.items():
        print(f"{name:<10} {size / mib:8.1f}")
    for s in got:
        print(f"set {s:<10} {sum(e['bytes'] for e in entries if e['set'] == s) / mib:8.1f} MiB "
              f"in {sum(1 for e in entries if e['set'] == s)} wheels")
    print(f"total {sum(sizes.values()) / mib:.1f} MiB")
    return 1 if missing else 0


# ---------------------------------------------------------------------------------------------
# Install (GPU host).


def carry_folders(wheels: Path) -> list[Path]:
    """Where carried pieces may be: the carry folders under `wheels` and the stash (pieces
    carried in earlier calls and moved out of the working tree: `stash`)."""
    found = [p for p in sorted(wheels.glob("*")) if p.is_dir() and p.name != "download"]
    if STASH.is_dir():
        found += [p for p in sorted(STASH.glob("*")) if p.is_dir()]
    return found


def load_manifest(folders: list[Path]) -> dict | None:
    newest = None
    for f in folders:
        m = f / MANIFEST
        if m.is_file():
            data = json.loads(m.read_text())
            if newest is None or data["created"] > newest["created"]:
                newest = data
    return newest


def install(wheels: Path, site: Path, log=print, timeout_s: float = 60) -> dict:
    """Join and check every carried set, pip install the complete ones into `site` (--target,
    --no-deps, --no-index: the host's torch is never touched), each pip run within
    `timeout_s`. Returns {set: "installed" | "incomplete: ..." | "failed: ..."}."""
    folders = carry_folders(wheels)
    manifest = load_manifest(folders)
    if manifest is None:
        return {"all": f"no {MANIFEST} in {wheels}/* or {STASH} (run make gpu-wheels and "
                       "carry .gpu-wheels/base)"}
    status = {}
    joined = Path(tempfile.mkdtemp(prefix="tricolor-wheels-"))
    try:
        for s in dict.fromkeys(e["set"] for e in manifest["files"]):
            files, problem = [], None
            for entry in (e for e in manifest["files"] if e["set"] == s):
                try:
                    files.append(join_parts(entry, folders, joined))
                except (FileNotFoundError, ValueError) as e:
                    problem = str(e)
                    break
            if problem:
                status[s] = f"incomplete: {problem}"
                continue
            site.mkdir(parents=True, exist_ok=True)
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                     "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                     *map(str, files)], capture_output=True, text=True,
                    timeout=timeout_s)
                status[s] = "installed" if proc.returncode == 0 else \
                    "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
            except subprocess.TimeoutExpired:
                status[s] = f"failed: pip ran past {timeout_s:.0f} s"
            log(f"wheel set {s}: {status[s]}")
            for f in files:
                f.unlink()
    finally:
        shutil.rmtree(joined, ignore_errors=True)
    # nvimgcodec's wheels ship nvidia/__init__.py: in --target that would make `nvidia` a
    # package of its own and hide the host's nvidia.* (cuDNN, NCCL, ...); extend_path merges
    init = site / "nvidia" / "__init__.py"
    if init.is_file():
        init.write_text("from pkgutil import extend_path\n\n"
                        "__path__ = extend_path(__path__, __name__)\n")
    return status


def stash_main(args) -> int:
    """Move the carry folders out of the working tree into the stash (an earlier call of a
    multi-call carry: docs/gpu-check.md), so that the next calls' copies cannot remove them."""
    STASH.mkdir(parents=True, exist_ok=True)
    for f in carry_folders(args.wheels):
        if f.parent != STASH and f.name != "base":
            target = STASH / f.name
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(f), target)
            print(f"stashed {f} -> {target}")
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.wheels",
                                description=(__doc__ or "").split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("pack", help="download and pack the wheels (CPU side)")
    w.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    w.add_argument("--sets", nargs="+", default=list(WHEEL_SETS), choices=list(WHEEL_SETS))
    w.add_argument("--cap", type=float, default=56.0, help="MiB per carry folder")
    i = sub.add_parser("install", help="join, verify and install the carried wheels")
    i.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    i.add_argument("--site", type=Path, default=Path("/tmp/tricolor-gpu-check/site"))
    s = sub.add_parser("stash", help="move carried folders out of the working tree")
    s.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    args = p.parse_args(argv)
    if args.command == "pack":
        return pack_main(args)
    if args.command == "stash":
        return stash_main(args)
    status = install(args.wheels, args.site)
    print(json.dumps(status, indent=2))
    return 0 if all(v == "installed" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
