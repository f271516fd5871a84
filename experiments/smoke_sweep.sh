#!/usr/bin/env bash
# A short CPU smoke sweep (a few minutes on 2 cores): experience replay at two batch ratios x two seeds on
# the 3-task smoke sequence, then its report. Extra arguments are Hydra overrides, e.g. seed=0,1,2.
#   bash experiments/smoke_sweep.sh
source "$(dirname "$0")/_common.sh"
sweep smoke_sweep experiment=smoke trainer.progress_bar=false \
  algorithm=er algorithm.replay_batch_ratio=0.1,0.5 seed=0,1 "$@"
