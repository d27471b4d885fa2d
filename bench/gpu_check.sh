#!/usr/bin/env bash
# GPU check of issue 9: one command, at most 8 minutes on one GPU (see bench/gpu_check.py).
# Trains the three teachers and the student a few dozen steps in 16-mixed and bf16-mixed on a tiny
# synthetic cohort (finite losses, rising Dice; non-zero exit otherwise) and prints teacher/student
# patches/s at 128^3, the student step with three teachers (online async, cached) over the student
# alone, full-case inference seconds at 240x240x155 and pixel-tier cases/s.
#   bench/gpu_check.sh            # on a GPU machine (make setup first)
#   bench/gpu_check.sh --dry-run  # the same code paths on CPU with tiny sizes (checks the script only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-offline}
exec timeout --signal=INT 480 "$PY" bench/gpu_check.py "$@"
