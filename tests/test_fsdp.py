"""FSDP2 (``trainer=fsdp_cpu``: two CPU processes, gloo) against DDP (``trainer=ddp_cpu``), same seed.

Each algorithm whose state is sharded runs twice in one process group (started once: process start-up
is most of the cost), once per strategy, each into its own run directory. R and the final weights must
agree within a tolerance set by reduction order only: DDP all-reduces whole gradients and sums penalties
over whole tensors, FSDP reduce-scatters and sums each shard before one all-reduce, and EWC's per-sample
gradients come from ``vmap`` under DDP and from one backward per sample under FSDP. Each is a float32
re-association (relative error ~1e-7 a step), grown over the run's few steps to at most ~1e-5.

Also: every rank holds 1/N of each per-parameter tensor while training (a shard, never a full copy).
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import TEST_ENV, free_port, in_process_overrides, join_ranks

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

#: The algorithms that run under FSDP; the others are refused in one sentence (tests/test_config.py).
SHARDED = ["sequential", "er", "multitask", "ewc", "ewc_online", "si"]
TRAINERS = ("ddp_cpu", "fsdp_cpu")
TIMEOUT_S = 900
RTOL, ATOL = 1e-4, 1e-5


def _rank(rank: int, port: int, root: str, repo_id: str, out: str) -> None:
    os.environ.update(
        TEST_ENV,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE="2",
    )
    from rich.console import Console

    from cl_vla.algorithms.sharded import is_dtensor
    from cl_vla.training.in_process import compose_run
    from cl_vla.training.loop import run_continual

    for algo in SHARDED:
        for trainer in TRAINERS:
            run_dir = Path(out) / trainer / algo
            try:
                overrides = [
                    *in_process_overrides(algo, root, repo_id, "fsdp2", steps=3),
                    f"trainer={trainer}",
                    "trainer.warmup_steps=1",
                ]
                cfg, algorithm, data, policy_cfg = compose_run(overrides, run_dir)
                run_continual(cfg, data, policy_cfg, algorithm, console=Console(quiet=True))
                if trainer == "fsdp_cpu":
                    _record_shards(algorithm, run_dir, rank, is_dtensor)
            except Exception:
                (Path(out) / f"error_{trainer}_{algo}_rank{rank}.txt").write_text(traceback.format_exc())
                raise


def _record_shards(algorithm, run_dir: Path, rank: int, is_dtensor) -> None:
    """Each per-parameter tensor the algorithm holds: whether a shard, its local and global sizes."""
    held = {}
    for store in ("_importance", "_anchor", "_big_omega", "_omega"):
        value = getattr(algorithm, store, None)
        if not isinstance(value, dict):
            continue
        items = (
            value.items()
            if not value or not isinstance(next(iter(value.values())), dict)
            else ((f"{t}/{n}", x) for t, d in value.items() for n, x in d.items())
        )
        for name, t in items:
            held[f"{store}/{name}"] = [
                is_dtensor(t),
                t.to_local().numel() if is_dtensor(t) else t.numel(),
                t.numel(),
            ]
    (run_dir / f"shards_rank{rank}.json").write_text(json.dumps(held))


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=False)
    return {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}


def test_fsdp_matches_ddp_and_shards_the_state(synthetic_libero, tmp_path: Path) -> None:
    root, repo_id, _ = synthetic_libero
    ctx = mp.start_processes(
        _rank,
        args=(free_port(), str(root), repo_id, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    join_ranks(ctx, tmp_path, TIMEOUT_S)

    for algo in SHARDED:
        runs = {t: tmp_path / t / algo for t in TRAINERS}
        R = {
            t: np.array(json.loads((d / "results.json").read_text())["matrix"], float)
            for t, d in runs.items()
        }
        assert np.isfinite(R["fsdp_cpu"]).all(), algo
        np.testing.assert_allclose(R["fsdp_cpu"], R["ddp_cpu"], rtol=RTOL, atol=ATOL, err_msg=algo)
        ddp, fsdp = (_final_weights(runs[t]) for t in TRAINERS)
        assert ddp.keys() == fsdp.keys(), algo
        for k in ddp:
            torch.testing.assert_close(
                fsdp[k], ddp[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k, a=algo: f"{a} {k}: {m}"
            )
        shards = [json.loads((runs["fsdp_cpu"] / f"shards_rank{r}.json").read_text()) for r in (0, 1)]
        assert shards[0].keys() == shards[1].keys(), algo
        for name, (is_shard, local, full) in shards[0].items():
            other = shards[1][name][1]
            assert is_shard and local + other == full, (
                f"{algo}: {name} is not split over the ranks ({local}+{other} of {full})"
            )
        if algo in ("ewc", "ewc_online", "si"):
            assert shards[0], f"{algo} holds no per-parameter state after two tasks"
