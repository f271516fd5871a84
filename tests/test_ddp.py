"""DDP with two CPU processes (gloo): the sequence runs to the end and the ranks agree on the buffer."""

from __future__ import annotations

import json

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
