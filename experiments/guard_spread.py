"""The guard test's runs (tests/test_metaworld_guard.py) for several seeds, to measure the spread its
margins must cover: prints each run's success matrix and wall time as one JSON line.

    .venv/bin/python experiments/guard_spread.py --algorithms sequential,er,multitask --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", default="sequential,er,multitask")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO / "tests"))
    from cl_vla.training.in_process import run_in_process
    from test_metaworld_guard import guard_overrides  # also sets the tests' offline environment

    for seed in args.seeds:
        for algo in args.algorithms.split(","):
            tic = time.time()
            with tempfile.TemporaryDirectory() as d:
                res, _, _ = run_in_process(guard_overrides(algo, seed), Path(d) / "run")
            R = [[round(float(v), 3) for v in row] for row in res["matrix"]]
            print(
                json.dumps({"algorithm": algo, "seed": seed, "R": R, "wall_s": round(time.time() - tic, 1)})
            )


if __name__ == "__main__":  # simulator workers are spawned processes: they re-import this module
    main()
