"""On a sequence built to interfere (same scenes, instruction-dependent actions), forgetting is
measurable and ordered: sequential forgets most, experience replay much less, joint training least."""

from __future__ import annotations

import pytest

from conftest import train_in_process

pytestmark = pytest.mark.slow

SPEC = {"episodes_per_task": 10, "frames_per_episode": 8, "image_size": 16}


def _run(algo, root, repo_id, tasks, run_dir):
    results = train_in_process(
        [
            f"algorithm={algo}",
            "task_sequence=custom",
            "task_sequence.name=interfere4",
            "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
            f"data.root={root}",
            f"data.repo_id={repo_id}",
            *(f"data.synthetic.{k}={v}" for k, v in SPEC.items()),
            "trainer.progress_bar=false",
            "data.num_workers=0",
            "data.batch_size=16",
            "model.image_size=16",
            "continual_learning.steps_per_task=100",
            "logger=none",
        ],
        run_dir,
    )
    return results["metrics"]


def test_sequential_forgets_er_less_multitask_least(synthetic_dataset_factory, tmp_path):
    from cl_vla.data.task_sequences import get_task_sequence

    tasks = list(get_task_sequence("libero_spatial").tasks[:4])
    root, repo_id, _ = synthetic_dataset_factory(tasks, **SPEC)
    m = {a: _run(a, root, repo_id, tasks, tmp_path / a) for a in ("sequential", "er", "multitask")}
    # Margins, not bare orderings: CPU training is repeatable on one machine, not across CPUs. Measured
    # spread (docs/forgetting_table.md, 3 seeds at these settings, and a second machine within 0.016):
    # BWT sequential -0.72 +- 0.07, ER -0.04 +- 0.03, multitask +0.03 +- 0.02; ACC (loss) 0.87 / 0.39 /
    # 0.35 with spreads <= 0.05. Every margin below is >= 3x the spread it has to cover. ER and multitask
    # are within noise of each other (a fresh machine had multitask 0.359 vs ER 0.355), so between those
    # two only "multitask is not clearly worse" is asserted.
    # BWT on the loss matrix is computed on -R: negative means forgetting.
    assert m["sequential"]["bwt"] < -0.3
    assert m["er"]["bwt"] > m["sequential"]["bwt"] + 0.3
    assert m["multitask"]["bwt"] > m["sequential"]["bwt"] + 0.3
    assert m["multitask"]["bwt"] > m["er"]["bwt"] - 0.15
    assert m["sequential"]["forgetting"] > 3 * max(m["er"]["forgetting"], 0.05)
    # Final average held-out loss: lower is better.
    assert m["er"]["acc"] < m["sequential"]["acc"] - 0.2
    assert m["multitask"]["acc"] < m["sequential"]["acc"] - 0.2
    assert m["multitask"]["acc"] < m["er"]["acc"] + 0.15
