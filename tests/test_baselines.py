"""Sequential (no-CL lower bound) and Multitask (joint-training upper bound): neutral hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cl_vla.algorithms import CLAlgorithm, Multitask, Sequential, TaskContext


@pytest.mark.parametrize("cls", [Sequential, Multitask])
def test_hooks_are_neutral(cls: type[CLAlgorithm]) -> None:
    algo = cls()
    batch = {"x": torch.zeros(2)}
    ctx = TaskContext(task_id=0, task_name="a", num_tasks=3)
    assert algo.observe(batch) is None
    assert algo.on_task_start(0, ctx) is None and algo.on_task_end(0, ctx) is None
    assert algo.penalty(None, batch, {}) is None
    assert algo.after_backward(None, batch) is None
    assert algo.replay_indices(8, np.random.default_rng(0)) == []
    assert algo.sample(4) is None  # the base class's default: the loop replays through replay_indices
    assert algo.replay_batch_ratio == 0.0
    state = json.loads(json.dumps(algo.state_dict()))
    assert state == {"name": cls.name}
    algo.load_state_dict(state)
    with pytest.raises(ValueError, match="er"):
        algo.load_state_dict({"name": "er"})


def test_sequential_trains_on_the_current_task_only() -> None:
    assert [Sequential().training_tasks(t) for t in range(3)] == [[0], [1], [2]]


def test_multitask_trains_on_every_task_so_far() -> None:
    algo = Multitask()
    assert algo.training_tasks(0) == [0]
    assert algo.training_tasks(4) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="-1"):
        algo.training_tasks(-1)


def test_names_are_distinct() -> None:
    assert {Sequential.name, Multitask.name} == {"sequential", "multitask"}
