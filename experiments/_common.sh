# Sourced by the recipes: run from the repository root with the project's Python, offline by default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
stamp() { date +%Y-%m-%d_%H-%M-%S; }

# sweep NAME ARGS...: one Hydra multirun into multirun/NAME/<time> (or $SWEEP_DIR), then its report.
sweep() {
  local name=$1; shift
  local dir="${SWEEP_DIR:-multirun/$name/$(stamp)}"
  echo "sweep $name -> $dir"
  "$PYTHON" train.py -m "experiment.name=$name" "$@" "hydra.sweep.dir=$dir"
  "$PYTHON" -m cl_vla.results.sweep_report "$dir" ${REPORT_ARGS:-}
}
