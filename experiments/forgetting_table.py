"""Average performance, BWT and forgetting of every algorithm on the forgetting-sensitive synthetic
sequence, mean +- std over seeds (one command):

    .venv/bin/python experiments/forgetting_table.py --seeds 0 1 2 --steps 100 > forgetting_table.md

The sequence: 4 LIBERO-Spatial instructions on synthetic LIBERO-schema data (10 episodes per task,
8 frames, 16x16 images) where the instruction alone decides the action, so tasks interfere. R is the
held-out action loss (lower is better); BWT and forgetting are computed on -R (negative BWT =
forgetting).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

SPEC = {"episodes_per_task": 10, "frames_per_episode": 8, "image_size": 16}
# CPU-sized costs (the YAML defaults are the papers'): memory gradients and Fisher estimates over a
# few dozen frames, so a 4-task run stays under a minute on two cores. Pass --paper-defaults to skip.
CPU_SIZED = {
    "gem": ["algorithm.memory_batch_size=16", "algorithm.memory_per_task=64"],
    "agem": ["algorithm.memory_batch_size=16"],
    "ewc": ["algorithm.fisher_samples=48"],
    "ewc_online": ["algorithm.fisher_samples=48"],
    "mir": ["algorithm.mir_candidates=16", "algorithm.k=4"],
    # tiny_vla starts from scratch: TAIL's adapters need a trained base, so task 0 trains it (see the YAML).
    "lora_per_task": ["algorithm.train_base_on_first_task=true"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", default="all", help="comma-separated conf/algorithm choices, or 'all'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--paper-defaults", action="store_true", help="no CPU-sized memory/Fisher settings")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from cl_vla.data.task_sequences import get_task_sequence
    from cl_vla.paths import cache_dir, conf_dir
    from cl_vla.training.in_process import run_in_process, sequence_overrides

    algos = (
        sorted(q.stem for q in (conf_dir() / "algorithm").glob("*.yaml"))
        if args.algorithms == "all"
        else args.algorithms.split(",")
    )
    tasks = list(get_task_sequence("libero_spatial").tasks[: args.tasks])
    spec = SyntheticSpec(instructions=tuple(tasks), **SPEC)
    root = cache_dir() / "datasets" / f"interfere_{spec.fingerprint()}"
    write_synthetic_dataset(root, "cl_vla/interfere", spec)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cl_vla_table_") as tmp:
        for algo in algos:
            per_seed = []
            for seed in args.seeds:
                overrides = [
                    f"algorithm={algo}",
                    *sequence_overrides("interfere", tasks),
                    f"data.root={root}",
                    "data.repo_id=cl_vla/interfere",
                    "data.synthetic=null",
                    "data.num_workers=0",
                    "data.batch_size=16",
                    "model.image_size=16",
                    f"continual_learning.steps_per_task={args.steps}",
                    f"seed={seed}",
                    "logger=none",
                    "trainer.progress_bar=false",
                    *([] if args.paper_defaults else CPU_SIZED.get(algo, [])),
                ]
                try:
                    res, _, _ = run_in_process(overrides, Path(tmp) / f"{algo}_{seed}")
                except Exception as e:  # one broken algorithm must not cost the others' numbers
                    print(f"# {algo} seed {seed}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                m = res["metrics"]
                per_seed.append((m["acc"], m["bwt"], m["forgetting"]))
                line = f"acc {m['acc']:.3f} bwt {m['bwt']:+.3f} forgetting {m['forgetting']:+.3f}"
                print(f"# {algo} seed {seed}: {line}", flush=True)
            if per_seed:
                rows[algo] = np.array(per_seed)
    print(f"\n{args.tasks} tasks, {args.steps} steps/task, seeds {args.seeds}; R = held-out action loss\n")
    print("| algorithm | ACC (loss, lower better) | BWT (neg. = forgetting) | forgetting |")
    print("|---|---|---|---|")
    for algo, a in rows.items():
        cells = [f"{a[:, k].mean():.3f} ± {a[:, k].std(ddof=1) if len(a) > 1 else 0:.3f}" for k in range(3)]
        print(f"| {algo} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
