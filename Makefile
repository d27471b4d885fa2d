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
# PRECISION: empty → the trainer preset's (cpu.yaml 32-true, gpu.yaml 16-mixed); `auto` → bf16-mixed
# where the GPU supports bfloat16 (A100, H100, RTX 30xx+), else 16-mixed (V100, T4); or any Lightning
# precision. It holds for the teachers' training and the student alike, and the student's frozen
# teachers follow it (AsyncTeacherDistillation precision: auto).
PRECISION ?=
_PRECISION = $(if $(filter auto,$(PRECISION)),$(shell $(PY) -c "import torch; c = torch.cuda.is_available(); print(('bf16-mixed' if torch.cuda.is_bf16_supported() else '16-mixed') if c else '32-true')"),$(PRECISION))
MAX_EPOCHS ?=
ARGS ?=
N ?= 16
SEED ?= 0
# feature tier (teachers, evaluate): DATA names configs/data/$(DATA).yaml; the trainer preset is
# cpu for the synthetic cohort, gpu (AMP) otherwise; STRATEGY (when set) and PRECISION (when non-empty) override the preset
# only when set on the command line; DEVICES or NODES > 1 add configs/trainer/ddp.yaml.
TRAINER ?= configs/trainer/$(if $(filter synthetic,$(DATA)),cpu,gpu).yaml
EVAL_CKPT ?= runs/teachers/mri/checkpoints/best.ckpt
EVAL_INPUT ?= data/$(DATA)
EVAL_OUT ?= runs/evaluate/$(DATA)


.PHONY: setup demo demo-mri test test-slow synth preprocess figures bench crosscheck clean-data help teachers teacher-mri teacher-us teacher-ct evaluate

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

# the quick single-model demo of the foundation stage (one MRI SegResNet, a few minutes)
demo-mri: setup
	$(TRIFUSE) synth --out data/synthetic --n $(N) --seed $(SEED) --size small
	$(TRIFUSE) preprocess --data data/synthetic
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
# the overlay on top of configs/teacher_<m>.yaml (CPU smoke settings on the synthetic cohort)
TEACHER_OVERLAY ?= $(if $(_SYNTH),configs/overlays/smoke.yaml)
TEACHER_CONFIGS = -c $(TRAINER) $(if $(_MULTI),-c configs/trainer/ddp.yaml) -c configs/data/$(DATA).yaml
TEACHER_OVERRIDES = --trainer.devices=$(DEVICES) --trainer.num_nodes=$(NODES) \
	$(if $(filter command line environment,$(origin STRATEGY)),--trainer.strategy=$(STRATEGY)) \
	$(if $(_PRECISION),--trainer.precision=$(_PRECISION)) \
	$(if $(MAX_EPOCHS),--trainer.max_epochs=$(MAX_EPOCHS))

define teacher_fit
	@mkdir -p runs/teachers/$(1)
	@if [ -f runs/teachers/$(1)/DATA ] && [ "$$(cat runs/teachers/$(1)/DATA)" != "$(DATA)" ]; then \
		echo "make teacher-$(1): error: runs/teachers/$(1) holds a run on $$(cat runs/teachers/$(1)/DATA); move it away to train on $(DATA)" >&2; exit 1; fi
	@echo "$(DATA)" > runs/teachers/$(1)/DATA
	$(TRIFUSE) fit $(TEACHER_CONFIGS) -c configs/teacher_$(1).yaml $(if $(TEACHER_OVERLAY),-c $(TEACHER_OVERLAY)) \
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

# --- the student, ablations and the full demo ------------------------------------------------------
# `make student DATA=brats2021 DEVICES=4` after `make teachers` and the semantic stages
# (make semantic). Each ablation is one run folder under runs/student/<name>/ and one W&B run in
# the group "student"; `trifuse compare runs/student/*` tabulates them offline.
ABLATIONS ?= mri_only no_pixel response_only no_semantic no_film full
CLIP_EPOCHS ?=
STUDENT_CONFIGS = $(TEACHER_CONFIGS) -c configs/student.yaml
STUDENT_OVERLAY ?= $(if $(_SYNTH),configs/overlays/student_smoke.yaml)
STUDENT_SMOKE = $(if $(STUDENT_OVERLAY),-c $(STUDENT_OVERLAY))
STUDENT_OVERRIDES = $(TEACHER_OVERRIDES) --model.init_args.clip_ckpt=runs/clip/$(DATA)/clip.pt

.PHONY: semantic student ablations report

semantic: setup
	$(TRIFUSE) describe --data data/$(DATA)
	$(TRIFUSE) clip --data data/$(DATA) $(if $(CLIP_EPOCHS),--epochs $(CLIP_EPOCHS))
	$(TRIFUSE) semantic --data data/$(DATA)

student: setup
	$(TRIFUSE) fit $(STUDENT_CONFIGS) -c configs/ablations/full.yaml $(STUDENT_SMOKE) $(STUDENT_OVERRIDES) --ckpt_path=last $(ARGS)

ablations: setup
	@for a in $(ABLATIONS); do \
		echo "=== ablation $$a ==="; \
		$(TRIFUSE) fit $(STUDENT_CONFIGS) -c configs/ablations/$$a.yaml $(STUDENT_SMOKE) $(STUDENT_OVERRIDES) --ckpt_path=last $(ARGS) || exit 1; \
	done
	$(TRIFUSE) compare $(addprefix runs/student/,$(ABLATIONS)) --out reports/ablations

# --- the main job: the whole three-tier pipeline on the built-in synthetic cohort, on CPU -------
# synth → preprocess → fit-ct → teachers (MRI, US, CT) → describe (offline) → clip → semantic →
# student and its MRI-only baseline (same steps, patches and data) → predict (held-out cohort)
# → evaluate → a full-size 1 mm case → figures (held-out truth vs prediction, the student's TC/ET
# attention beside its priors, cohort, physics, semantic) → report (its path is printed).
# Every stage skips work already done, so a second `make demo` only redoes what changed.
# About 26 min on 2 cores (25:57 measured on a fresh clone, venv included): the time goes to training (configs/overlays/teacher_demo.yaml and
# student_demo.yaml: the full recipe at CPU-fast settings, cached distillation); the other
# ablations are `make ablations DATA=synthetic` (or DEMO_ABLATIONS="...").
DEMO_ABLATIONS ?= mri_only full
DEMO_CLIP_EPOCHS ?= 8
DEMO_TEST_N ?= 8
# training length in epochs of 50 steps (batch 2); one validation at the end of each run
DEMO_EPOCHS_MRI ?= 7
DEMO_EPOCHS_PIXEL ?= 2
DEMO_EPOCHS_STUDENT ?= 10
# prediction of the held-out and full-size cases: without test-time mirroring, to stay within
# ~30 min (trifuse predict mirrors by default; bench/bench_predict_tta.py measures what it costs)
DEMO_PREDICT_ARGS ?= --no-tta
_demo_epochs = --trainer.max_epochs=$(1) --trainer.check_val_every_n_epoch=$(1)
demo: export WANDB_MODE ?= offline
demo: setup
	$(TRIFUSE) synth --out data/synthetic --n $(N) --seed $(SEED) --size small
	$(TRIFUSE) synth --out data/synthetic-test --n $(DEMO_TEST_N) --seed $$(( $(SEED) + 1000 )) --size small
	$(TRIFUSE) preprocess --data data/synthetic
	$(TRIFUSE) physics fit-ct --data data/synthetic
	$(MAKE) --no-print-directory teacher-mri DATA=synthetic TEACHER_OVERLAY=configs/overlays/teacher_demo.yaml \
		ARGS="$(call _demo_epochs,$(DEMO_EPOCHS_MRI)) $(ARGS)"
	$(MAKE) --no-print-directory teacher-us teacher-ct DATA=synthetic TEACHER_OVERLAY=configs/overlays/teacher_demo.yaml \
		ARGS="$(call _demo_epochs,$(DEMO_EPOCHS_PIXEL)) $(ARGS)"
	$(MAKE) --no-print-directory semantic DATA=synthetic CLIP_EPOCHS=$(DEMO_CLIP_EPOCHS)
	$(MAKE) --no-print-directory ablations DATA=synthetic ABLATIONS="$(DEMO_ABLATIONS)" STUDENT_OVERLAY=configs/overlays/student_demo.yaml \
		ARGS="$(call _demo_epochs,$(DEMO_EPOCHS_STUDENT)) $(ARGS)"
	$(TRIFUSE) predict --ckpt runs/student/full/checkpoints/best.ckpt --input data/synthetic-test --output runs/demo/pred $(DEMO_PREDICT_ARGS)
	$(TRIFUSE) evaluate --pred runs/demo/pred --data data/synthetic-test --out reports/demo/eval
	$(TRIFUSE) predict --ckpt runs/student/mri_only/checkpoints/best.ckpt --input data/synthetic-test --output runs/demo/pred-mri_only $(DEMO_PREDICT_ARGS)
	$(TRIFUSE) evaluate --pred runs/demo/pred-mri_only --data data/synthetic-test --out reports/demo/eval-mri_only
	$(MAKE) --no-print-directory demo-fullsize FULLSIZE_ARGS="$(DEMO_PREDICT_ARGS)"
	$(TRIFUSE) figures cases --data data/synthetic-test --pred runs/demo/pred --out reports/demo/cases.png
	$(TRIFUSE) figures attention --ckpt runs/student/full/checkpoints/best.ckpt --data data/synthetic-test \
		--cases $(DEMO_TEST_N) --out reports/demo/attention.png
	$(TRIFUSE) figures cohort --data data/synthetic --out reports/demo/cohort.png
	$(TRIFUSE) figures physics --data data/synthetic --out reports/demo/physics.png
	$(TRIFUSE) figures semantic --data data/synthetic --out reports/demo/semantic.png
	$(TRIFUSE) report --out reports/demo --eval student=reports/demo/eval mri_only=reports/demo/eval-mri_only \
		--fullsize $(FULLSIZE_EVAL) \
		--teachers runs/teachers/mri runs/teachers/us runs/teachers/ct \
		--runs $(addprefix runs/student/,$(DEMO_ABLATIONS)) \
		--figures reports/demo/cases.png reports/demo/attention.png reports/demo/cohort.png reports/demo/physics.png \
		reports/demo/semantic.png reports/ablations/compare.png

# --- the full-size path: one BraTS-grid case (1 mm, 240×240×155, a seed apart from the training
# and held-out cohorts) predicted by the demo's checkpoint, trained on 2 mm cases, through the
# spacing-aware path (resampled to the training spacing, probabilities resampled back), then scored.
# predict writes $(FULLSIZE_PRED).predict.json beside it (shape, spacing, model spacing, seconds);
# `trifuse report --fullsize $(FULLSIZE_EVAL)` gives the case its section.
FULLSIZE_CKPT ?= runs/student/full/checkpoints/best.ckpt
FULLSIZE_SEED ?= 2000
FULLSIZE_DATA ?= data/synthetic-full
FULLSIZE_PRED ?= runs/demo/pred-full
FULLSIZE_EVAL ?= reports/demo/eval-full
.PHONY: demo-fullsize
demo-fullsize: export WANDB_MODE ?= offline
demo-fullsize: setup
	$(TRIFUSE) synth --out $(FULLSIZE_DATA) --n 1 --seed $(FULLSIZE_SEED) --size full
	$(TRIFUSE) predict --ckpt $(FULLSIZE_CKPT) --input $(FULLSIZE_DATA) --output $(FULLSIZE_PRED) $(FULLSIZE_ARGS)
	$(TRIFUSE) evaluate --pred $(FULLSIZE_PRED) --data $(FULLSIZE_DATA) --out $(FULLSIZE_EVAL)
