#!/usr/bin/env bash
# Every experiment of this folder, in priority order; each skips what is done and resumes an
# interrupted run from its checkpoint, so this can be started again after any stop.
#   nohup experiments/run_all.sh > runs/experiments.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
for config in smoke single_teacher adoption "$@"; do
  .venv/bin/student-trainer experiment --config "experiments/$config.yaml" || echo "[run_all] $config failed"
done
