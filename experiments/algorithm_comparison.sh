#!/usr/bin/env bash
# Algorithm comparison on the embedded default sequence (no data to fetch): the lower bound
# (sequential fine-tuning), experience replay and the upper bound (multitask), 3 seeds each, then the
# report. Add algorithms as they land (algorithm=sequential,er,multitask,<new>). Parallel runs on one
# machine: hydra/launcher=joblib hydra.launcher.n_jobs=3; W&B: logger=default (on by default).
#   bash experiments/algorithm_comparison.sh [hydra/launcher=joblib hydra.launcher.n_jobs=3] [trainer=gpu]
source "$(dirname "$0")/_common.sh"
REPORT_ARGS="${REPORT_ARGS:---metric acc bwt forgetting fwt}" \
  sweep algorithm_comparison algorithm=sequential,er,multitask seed=0,1,2 "$@"
