# The project's two commands: `make demo` and `make test`. Both create .venv when it is missing
# and (re)install only when setup.cfg or this Makefile changed since the last install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that this machine kind carries locally; on other hosts set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
# DALI publishes Linux x86_64 wheels only; elsewhere the webdataset backend is used.
EXTRAS ?= dev,demo$(shell [ "$$(uname -sm)" = "Linux x86_64" ] && echo ,dali)
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m shards build "$$($(PY) -m shards sample)" --out $(DEMO_OUT)/shards --overwrite --short-side 128 --samples-per-shard 64
	$(PY) -m shards verify $(DEMO_OUT)/shards

test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info
