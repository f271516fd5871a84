#!/usr/bin/env bash
# Replay-ratio sweep on the embedded default (Meta-World mw_short, closed-loop success; no data to
# fetch): ER at 4 replay batch ratios (0 = no replay) x 3 seeds, then the report. About 4.5 min per run
# on 2 CPU cores (one torch thread per run, as `make run`); parallel: hydra/launcher=joblib
# hydra.launcher.n_jobs=2.
#   bash experiments/replay_ratio_metaworld.sh [trainer=gpu]
source "$(dirname "$0")/_common.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
REPORT_ARGS="${REPORT_ARGS:---metric acc bwt forgetting libero_nbt}" \
  sweep replay_ratio_metaworld experiment=metaworld_default trainer.progress_bar=false \
  algorithm=er algorithm.replay_batch_ratio=0.0,0.1,0.3,0.5 seed=0,1,2 "$@"
