"""DDP with two CPU processes (gloo): the sequence runs to the end and the ranks agree on the buffer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_train, synthetic_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_two_process_ddp_runs_sequence_and_ranks_agree(synthetic_libero, tmp_path):
    from cl_vla.data.task_sequences import get_task_sequence

    root, repo_id, _ = synthetic_libero
    tasks = list(get_task_sequence("libero_spatial").tasks[:3])
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            "trainer=ddp_cpu",
            "algorithm=er",
            "algorithm.buffer_size_per_task=5",
            "task_sequence=custom",
            "task_sequence.name=ddp3",
            "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
            *synthetic_overrides(root, repo_id),
            "trainer.progress_bar=false",
            "data.num_workers=0",
            "data.batch_size=4",
            "model.image_size=16",
            "continual_learning.steps_per_task=4",
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    R = np.array(json.loads((run_dir / "results.json").read_text())["matrix"], dtype=float)
    assert R.shape == (3, 3) and np.isfinite(R).all()
    states = [json.loads((run_dir / "rank_states" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["task"] == states[1]["task"] == 2
    assert states[0]["sha256"] == states[1]["sha256"]


def _sim_eval_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One DDP rank of a closed-loop evaluation whose episodes 'succeed' when their id is even."""
    import os
    import types
    from contextlib import nullcontext

    import torch
    import torch.distributed as dist
    from lerobot.configs.types import FeatureType, PolicyFeature

    from cl_vla.envs.metaworld_eval import MetaworldEvaluator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ran: list[list[int]] = []

    class Recording(MetaworldEvaluator):
        def _task(self, module, task, label, deadline, episodes, rank):  # no simulator: the split is tested
            ran.append(list(episodes))
            return sum(1 for e in episodes if e % 2 == 0), len(episodes)

    policy_cfg = types.SimpleNamespace(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(4,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(4,))},
    )
    eval_cfg = types.SimpleNamespace(
        episodes=5, max_episode_steps=10, seed=1000, timeout_s=None, videos=0, num_workers=1
    )
    evaluator = Recording(["reach-v3", "push-v3"], ["reach", "push"], policy_cfg, eval_cfg)
    module = types.SimpleNamespace(
        policy=torch.nn.Linear(1, 1),
        device=torch.device("cpu"),
        algorithm=types.SimpleNamespace(eval_context=lambda task, module: nullcontext()),
    )
    rates = evaluator.evaluate(module, [0, 1])
    out = {"rates": rates, "ran": ran, "episodes": evaluator.stats.episodes}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_sim_evaluation_splits_episodes_over_ranks_and_sums_successes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sim_eval_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert out[0]["ran"] == [[0, 2, 4], [0, 2, 4]] and out[1]["ran"] == [[1, 3], [1, 3]]
    assert out[0]["rates"] == out[1]["rates"] == [0.6, 0.6]  # episodes 0, 2, 4 of 5
    assert out[0]["episodes"] == out[1]["episodes"] == 10  # every rank's episodes counted, none twice
