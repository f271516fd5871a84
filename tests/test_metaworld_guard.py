"""A guard on the closed-loop benchmark (Meta-World, success rates; docs/results.md), cut to a CPU test:
two tasks whose motions conflict on the same object (the window opened, then closed), one seed, 6
evaluation episodes a task. It asserts only what holds on any CPU: sequential fine-tuning forgets the
first task clearly, experience replay keeps clearly more of it, and multitask training is the upper
reference (keeps clearly more than sequential, ends above it, and not clearly below replay).

Measured spread (experiments/guard_spread.py, seeds 0-4, 2-core CPUs; R[1][0] = success on the first
task after learning the second, in sixths): sequential keeps 0 of 6 on every seed, ER 5-6, multitask
4-6. Every margin below leaves at least 2 whole episodes of room on the worst seed measured
(docs/results.md, "The guard").
"""

from __future__ import annotations

import pytest

from conftest import train_in_process

# Part of `make test` (about 3 min of one worker); `make test-guard` runs it alone.
pytestmark = [pytest.mark.slow, pytest.mark.guard]

TASKS = ["window-open-v3", "window-close-v3"]  # the same window, opened then closed: actions conflict
SEQ_NAME = "mw_guard2"


def guard_overrides(algo: str, seed: int = 0) -> list[str]:
    """The guard's run: 6 recorded episodes a task at 32 px, 150 steps a task, 6 evaluation episodes."""
    from cl_vla.envs.metaworld import task_description

    tasks = ",".join(f"'{task_description(t)}'" for t in TASKS)
    return [
        f"algorithm={algo}",
        "task_sequence=custom",
        f"task_sequence.name={SEQ_NAME}",
        "task_sequence.suite=metaworld",
        f"task_sequence.tasks=[{tasks}]",
        f"task_sequence.env_tasks=[{','.join(TASKS)}]",
        "data=metaworld",
        "data.record.episodes_per_task=6",
        "data.record.image_size=32",
        "data.heldout_fraction=0.17",
        "data.num_workers=0",
        "data.batch_size=16",
        "model.image_size=32",
        "eval=sim",
        "eval.episodes=6",
        "eval.max_episode_steps=120",  # the experts' episodes are about 80 steps
        "eval.num_workers=1",
        "continual_learning.steps_per_task=150",
        "continual_learning.save_checkpoint_per_task=false",
        "continual_learning.export_per_task=false",
        "trainer.progress_bar=false",
        "logger=none",
        f"seed={seed}",
    ]


def test_sequential_forgets_replay_keeps_multitask_is_the_reference(tmp_path):
    R = {}
    for algo in ("sequential", "er", "multitask"):
        R[algo] = [
            list(map(float, row))
            for row in train_in_process(guard_overrides(algo), tmp_path / algo)["matrix"]
        ]
    kept = {a: R[a][1][0] for a in R}  # success on the first task after learning the second
    final = {a: (R[a][1][0] + R[a][1][1]) / 2 for a in R}  # in twelfths: 6 episodes on each task
    episode = 1 / 6
    assert kept["sequential"] <= 2 * episode + 1e-9, R
    assert kept["er"] >= kept["sequential"] + 3 * episode - 1e-9, R
    assert kept["multitask"] >= kept["sequential"] + 2 * episode - 1e-9, R
    # The upper reference: multitask ends above sequential (one more successful episode in twelve at
    # least) and not clearly below replay (at most 3 of twelve fewer).
    assert final["multitask"] >= final["sequential"] + episode / 2 - 1e-9, R
    assert final["multitask"] >= final["er"] - 3 * episode / 2 - 1e-9, R
