#!/usr/bin/env bash
# Replay-ratio sweep on LIBERO-Spatial (10 tasks, the seed's 10k steps per task), for users with the
# LIBERO demonstrations: LIBERO_ROOT=/path/to/libero (a LeRobot v3 copy); unset, lerobot downloads
# HuggingFaceVLA/libero from the hub (set HF_HUB_OFFLINE=0). On a GPU (trainer=gpu), one run at a time;
# on SLURM add hydra/launcher=slurm hydra.launcher.partition=<p> (pip install -e '.[cluster]').
#   LIBERO_ROOT=~/data/libero bash experiments/replay_ratio_libero_spatial.sh [hydra/launcher=slurm]
source "$(dirname "$0")/_common.sh"
sweep replay_ratio_libero_spatial \
  data=libero ${LIBERO_ROOT:+data.root=$LIBERO_ROOT} task_sequence=libero_spatial trainer=gpu \
  continual_learning.steps_per_task=10000 \
  algorithm=er algorithm.replay_batch_ratio=0.05,0.1,0.3,0.5 seed=0,1,2 "$@"
