#!/usr/bin/env bash
# Rehearse the hub VLAs on a GPU before paying for a real run: every tiny twin (lerobot's SmolVLA, pi0,
# pi0.5 and GR00T classes and processors, random weights) trains a 3-task smoke sequence with
# trainer=gpu (bf16 mixed precision, CL math in fp32) under the algorithms whose state differs most,
# then its per-task export is loaded back with lerobot's from_pretrained on CUDA and asked for actions.
# Then the same twins under FSDP over every visible GPU (trainer=fsdp: bf16 compute, fp32 reductions,
# the CL state sharded) with the algorithms whose state is sharded, export gathered onto rank 0.
# Offline; about a minute per twin. TRAINER=cpu runs the same checks without a GPU (FSDP: fsdp_cpu).
#
#   scripts/gpu_twin_check.sh                 # all twins x er ewc gem packnet lora_per_task, then FSDP
#   TWINS="smolvla_tiny" ALGOS="er" FSDP_ALGOS="ewc" scripts/gpu_twin_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TRAINER=${TRAINER:-gpu}
TWINS=${TWINS:-"smolvla_tiny pi0_tiny pi05_tiny groot_tiny"}
ALGOS=${ALGOS:-"er ewc gem packnet lora_per_task"}
FSDP_ALGOS=${FSDP_ALGOS:-"ewc si gem mir"}
FSDP_TRAINER=$([ "$TRAINER" = gpu ] && echo fsdp || echo fsdp_cpu)
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
OUT=$(mktemp -d -t cl_vla_gpu_twins.XXXXXX)
if [ "$TRAINER" = gpu ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with TRAINER=cpu")'
fi
device=$([ "$TRAINER" = gpu ] && echo cuda || echo cpu)
failed=0
check() {  # check <trainer> <twin> <algorithm>
  local trainer=$1 twin=$2 algo=$3
  local run="$OUT/$trainer-$twin-$algo"
  if "$PY" train.py experiment=smoke "model=$twin" "algorithm=$algo" "trainer=$trainer" \
        continual_learning.steps_per_task=10 trainer.progress_bar=false "hydra.run.dir=$run" \
        >"$run.log" 2>&1 \
      && "$PY" - "$run" "$device" <<'PY' >>"$run.log" 2>&1
import json, sys
from pathlib import Path

import torch

from cl_vla.policies.factory import load_policy

run, device = Path(sys.argv[1]), sys.argv[2]
R = json.loads((run / "results.json").read_text())["matrix"]
assert len(R) == 3 and all(v is not None for v in R[-1]), R
policy, pre, post = load_policy(run / "export" / "task_02", device=device)
obs = {
    "observation.images.image": torch.rand(3, 32, 32),
    "observation.images.wrist_image": torch.rand(3, 32, 32),
    "observation.state": torch.zeros(8),
    "task": "pick up the black bowl on the plate",
}
with torch.no_grad():
    action = post(policy.select_action(pre(obs)))
assert action.shape[-1] == 7 and torch.isfinite(action).all(), action
print("export ok", tuple(action.shape), "R[-1] =", [round(v, 4) for v in R[-1]])
PY
  then
    echo "ok    $trainer $twin $algo ($(tail -1 "$run.log"))"
  else
    echo "FAIL  $trainer $twin $algo: see $run.log"; failed=1
  fi
}
for twin in $TWINS; do
  for algo in $ALGOS; do check "$TRAINER" "$twin" "$algo"; done
done
for twin in $TWINS; do
  for algo in $FSDP_ALGOS; do check "$FSDP_TRAINER" "$twin" "$algo"; done
done
exit $failed
