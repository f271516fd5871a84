"""Every shipped algorithm under DDP (two CPU processes, gloo): the run ends, and after its last task
both ranks hold the same algorithm state (importances, memories, teachers, masks, adapters reduced or
kept consistent), so the replicas never drift apart.

Both ranks run every algorithm in turn inside one process group (started once: process start-up is
most of the cost), each algorithm into its own run directory, where the loop writes each rank's
digest of the algorithm state at every task end (``rank_states/rank<r>.json``, the last one kept).
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from conftest import CONF_DIR, TEST_ENV, free_port, in_process_overrides, join_ranks

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

ALGORITHMS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
TIMEOUT_S = 900  # a collective that only one rank enters would hang: fail instead


def _rank(rank: int, port: int, root: str, repo_id: str, out: str) -> None:
    os.environ.update(
        TEST_ENV,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),  # Lightning then joins this process group instead of launching one
        NODE_RANK="0",
        WORLD_SIZE="2",
    )
    from rich.console import Console

    from cl_vla.training.in_process import compose_run
    from cl_vla.training.loop import run_continual

    for algo in ALGORITHMS:
        run_dir = Path(out) / algo
        try:
            overrides = [
                *in_process_overrides(algo, root, repo_id, "ddp2", steps=3),
                "trainer=ddp_cpu",
                "trainer.warmup_steps=1",
            ]
            cfg, algorithm, data, policy_cfg = compose_run(overrides, run_dir)
            run_continual(cfg, data, policy_cfg, algorithm, console=Console(quiet=True))
        except Exception:
            (Path(out) / f"error_{algo}_rank{rank}.txt").write_text(traceback.format_exc())
            raise


def test_every_algorithm_runs_under_ddp_and_ranks_agree(synthetic_libero, tmp_path: Path) -> None:
    root, repo_id, _ = synthetic_libero
    ctx = mp.start_processes(
        _rank,
        args=(free_port(), str(root), repo_id, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    join_ranks(ctx, tmp_path, TIMEOUT_S)

    for algo in ALGORITHMS:
        run_dir = tmp_path / algo
        R = np.array(json.loads((run_dir / "results.json").read_text())["matrix"], dtype=float)
        assert R.shape == (2, 2) and np.isfinite(R).all(), algo
        states = [json.loads((run_dir / "rank_states" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert states[0]["task"] == states[1]["task"] == 1, algo
        assert states[0]["sha256"] == states[1]["sha256"], f"{algo}: ranks hold different algorithm states"
