"""The batch sampler: replay mixing at the configured ratio, per-rank draws, exact replays of a step."""

from __future__ import annotations

import numpy as np
import pytest

from cl_vla.algorithms.er import ReplayBuffer
from cl_vla.algorithms.multitask import Multitask
from cl_vla.algorithms.sequential import Sequential
from cl_vla.data.datamodule import ContinualBatchSampler


class _Stream:
    """A stand-in for TaskFilteredDataset: global indices into a shared dataset."""

    def __init__(self, start: int, n: int) -> None:
        self.frame_indices = np.arange(start, start + n)
        self.base_dataset = list(range(10_000))

    def __len__(self) -> int:
        return len(self.frame_indices)

    def __getitem__(self, i: int) -> int:
        return int(self.frame_indices[i])


def _er_with_two_tasks() -> ReplayBuffer:
    er = ReplayBuffer(buffer_size_per_task=20, seed=3, replay_batch_ratio=0.25)
    er.populate_from_dataset(0, _Stream(0, 100))
    er.populate_from_dataset(1, _Stream(100, 100))
    return er


def _sampler(algo, rank=0, start=0, steps=50, batch=16):
    current = np.arange(500, 600)
    return ContinualBatchSampler(
        current, algo, batch, seed=0, task=2, rank=rank, start_step=start, num_steps=steps
    )


def test_replay_share_and_sources():
    er = _er_with_two_tasks()
    stored = {i for t in er.get_task_ids() for i in er.replay_indices(10_000, np.random.default_rng(0))}
    for batch in _sampler(er):
        assert len(batch) == 16
        cur, rep = batch[:12], batch[12:]
        assert all(500 <= i < 600 for i in cur)  # 1 - 0.25 of the batch from the current task
        assert len(rep) == 4 and set(rep) <= stored


def test_no_replay_before_anything_is_stored():
    er = ReplayBuffer(buffer_size_per_task=20, seed=3, replay_batch_ratio=0.5)
    assert all(len(b) == 16 and all(500 <= i < 600 for i in b) for b in _sampler(er))


def test_ranks_draw_different_samples_and_steps_are_reproducible():
    er = _er_with_two_tasks()
    r0, r1 = list(_sampler(er, rank=0)), list(_sampler(er, rank=1))
    assert sum(a != b for a, b in zip(r0, r1, strict=True)) == len(r0)
    assert sum(a[12:] != b[12:] for a, b in zip(r0, r1, strict=True)) > len(r0) // 2  # replay parts too
    resumed = list(_sampler(er, start=20))
    assert resumed == r0[20:]  # a resumed run draws exactly the batches of the uninterrupted one


def test_length_counts_the_whole_task_even_when_resuming():
    assert len(_sampler(Sequential(), start=20, steps=50)) == 50
    assert len(list(_sampler(Sequential(), start=20, steps=50))) == 30


def test_multitask_widens_training_tasks():
    assert Multitask().training_tasks(3) == [0, 1, 2, 3]


def test_empty_task_is_an_error():
    with pytest.raises(ValueError, match="no training frames"):
        ContinualBatchSampler(
            np.array([], dtype=np.int64), Sequential(), 4, seed=0, task=0, rank=0, start_step=0, num_steps=3
        )
