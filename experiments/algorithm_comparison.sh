#!/usr/bin/env bash
# Algorithm comparison on the embedded default (Meta-World mw_short, closed-loop success; no data to
# fetch): the lower bound (sequential fine-tuning), the CL algorithms and the upper bound (multitask),
# 3 seeds each, then the report. 27 runs of about 4.5 min on 2 CPU cores (ER; GEM-style ones longer); narrow it with
# ALGORITHMS=sequential,er,multitask. Parallel runs on one machine: hydra/launcher=joblib
# hydra.launcher.n_jobs=2; W&B: logger=default (on by default).
#   bash experiments/algorithm_comparison.sh [hydra/launcher=joblib hydra.launcher.n_jobs=2] [trainer=gpu]
source "$(dirname "$0")/_common.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ALGORITHMS="${ALGORITHMS:-sequential,er,derpp,ewc_online,si,lwf,agem,packnet,multitask}"
REPORT_ARGS="${REPORT_ARGS:---metric acc bwt forgetting fwt}" \
  sweep algorithm_comparison experiment=metaworld_default trainer.progress_bar=false \
  "algorithm=$ALGORITHMS" seed=0,1,2 "$@"
