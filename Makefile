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
# feature tier (teachers, evaluate): DATA names configs/data/$(DATA).yaml; the trainer preset is
# cpu for the synthetic cohort, gpu (AMP) otherwise; STRATEGY and PRECISION override the preset
# only when set on the command line; DEVICES or NODES > 1 add configs/trainer/ddp.yaml.
TRAINER ?= configs/trainer/$(if $(filter synthetic,$(DATA)),cpu,gpu).yaml
EVAL_CKPT ?= runs/teachers/mri/checkpoints/best.ckpt
EVAL_INPUT ?= data/$(DATA)
EVAL_OUT ?= runs/evaluate/$(DATA)

.PHONY: setup demo test test-slow synth preprocess figures bench crosscheck clean-data help teachers teacher-mri teacher-us teacher-ct evaluate

help:
	@echo "make demo | test | test-slow | synth | preprocess | figures | bench | teachers | evaluate"

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

# cross-check our metrics against the official BraTS package, kept in its own venv
# (it pins old numpy/pandas/rich and must never enter .venv)
.venv-brats/.installed:
	$(PYTHON) -m venv .venv-brats
	.venv-brats/bin/pip install brats-evaluation
	touch $@

crosscheck: setup .venv-brats/.installed
	$(PY) bench/crosscheck_brats_eval.py --venv .venv-brats

# the main job on the built-in synthetic cohort, on CPU
demo: setup
	$(TRIFUSE) synth --out data/synthetic --n $(N) --seed $(SEED) --size small
	$(TRIFUSE) preprocess --data data/synthetic
	$(TRIFUSE) figures cohort --data data/synthetic --out reports/demo/cohort.png
	WANDB_MODE=$${WANDB_MODE:-offline} $(TRIFUSE) fit --config configs/demo_mri.yaml $(ARGS)

# --- feature tier: the three teachers, prediction and evaluation ---------------------------------
# `make teachers DATA=brats2021 DEVICES=4` trains on 4 GPUs with DDP; on a SLURM cluster run
# `srun --ntasks-per-node=4 make teacher-mri DATA=brats2021 DEVICES=4 NODES=2` (Lightning reads
# the SLURM/torchrun environment). Each teacher writes runs/teachers/<modality>/: checkpoints/
# {best,last}.ckpt (what the student reads), csv/ and wandb/ logs, media/ overlays and tables.
# A second run resumes from last.ckpt (a finished run stops at once); a run folder made on
# another DATA is refused, so a student never reads a teacher of the wrong dataset. On the
# synthetic cohort configs/overlays/smoke.yaml makes it a CPU smoke run (small net, 2 short epochs).
_MULTI := $(or $(filter-out 1,$(DEVICES)),$(filter-out 1,$(NODES)))
_SYNTH := $(filter synthetic,$(DATA))
TEACHER_CONFIGS = -c $(TRAINER) $(if $(_MULTI),-c configs/trainer/ddp.yaml) -c configs/data/$(DATA).yaml
TEACHER_OVERRIDES = --trainer.devices=$(DEVICES) --trainer.num_nodes=$(NODES) \
	$(if $(filter command line environment,$(origin STRATEGY)),--trainer.strategy=$(STRATEGY)) \
	$(if $(filter command line environment,$(origin PRECISION)),--trainer.precision=$(PRECISION)) \
	$(if $(MAX_EPOCHS),--trainer.max_epochs=$(MAX_EPOCHS))

define teacher_fit
	@mkdir -p runs/teachers/$(1)
	@if [ -f runs/teachers/$(1)/DATA ] && [ "$$(cat runs/teachers/$(1)/DATA)" != "$(DATA)" ]; then \
		echo "make teacher-$(1): error: runs/teachers/$(1) holds a run on $$(cat runs/teachers/$(1)/DATA); move it away to train on $(DATA)" >&2; exit 1; fi
	@echo "$(DATA)" > runs/teachers/$(1)/DATA
	$(TRIFUSE) fit $(TEACHER_CONFIGS) -c configs/teacher_$(1).yaml $(if $(_SYNTH),-c configs/overlays/smoke.yaml) \
		$(TEACHER_OVERRIDES) --ckpt_path=last $(ARGS)
endef

teachers: teacher-mri teacher-us teacher-ct

teacher-mri: setup
	$(call teacher_fit,mri)

teacher-us: setup
	$(call teacher_fit,us)

teacher-ct: setup
	$(call teacher_fit,ct)

# predict every case of EVAL_INPUT with EVAL_CKPT, then score them (BraTS conventions)
evaluate: setup
	$(TRIFUSE) predict --ckpt $(EVAL_CKPT) --input $(EVAL_INPUT) --output $(EVAL_OUT)/pred
	$(TRIFUSE) evaluate --pred $(EVAL_OUT)/pred --data $(EVAL_INPUT) --out $(EVAL_OUT)

clean-data:
	rm -rf data/synthetic data/cache runs reports
