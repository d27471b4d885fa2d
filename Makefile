# TriFuse: every target creates the virtual environment it needs (make setup).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TRIFUSE := $(VENV)/bin/trifuse
STAMP := $(VENV)/.installed

# user-facing knobs (see README)
DATA ?= synthetic
DEVICES ?= 1
NODES ?= 1
STRATEGY ?= auto
PRECISION ?= 32-true
MAX_EPOCHS ?=
ARGS ?=
N ?= 16
SEED ?= 0

.PHONY: setup demo test test-slow synth preprocess figures bench clean-data help

help:
	@echo "make demo | test | test-slow | synth | preprocess | figures | bench"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# the pinned CPU/CUDA torch first: a bare `torch` requirement would pull a multi-GB build
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	WANDB_MODE=offline $(PY) -m pytest -q

test-slow: setup
	WANDB_MODE=offline $(PY) -m pytest -q -m "slow"

synth: setup
	$(TRIFUSE) synth --out data/synthetic --n $(N) --seed $(SEED) --size small

preprocess: setup
	$(TRIFUSE) preprocess --data data/$(DATA)

figures: setup
	$(TRIFUSE) figures cohort --data data/$(DATA) --out reports/figures/cohort.png

bench: setup
	$(PY) bench/bench_data.py

# the main job on the built-in synthetic cohort, on CPU
demo: setup
	$(TRIFUSE) synth --out data/synthetic --n $(N) --seed $(SEED) --size small
	$(TRIFUSE) preprocess --data data/synthetic
	$(TRIFUSE) figures cohort --data data/synthetic --out reports/demo/cohort.png
	WANDB_MODE=$${WANDB_MODE:-offline} $(TRIFUSE) fit --config configs/demo_mri.yaml $(ARGS)

clean-data:
	rm -rf data/synthetic data/cache runs reports
