"""Per-task training loaders whose batches mix current-task frames with replayed references.

The batch sampler runs in the main process and yields dataset indices only; frames (current and
replayed alike) are decoded by the DataLoader's workers. Each batch is a pure function of
``(seed, task, rank, step)``, so a resumed run draws exactly the batches an uninterrupted one draws,
and every DDP rank draws its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cl_vla.algorithms.base import CLAlgorithm
from cl_vla.data.streams import ContinualData

_SAMPLER_STREAM = 7_001  # keeps these generators apart from every other seeded stream of the run


class ContinualBatchSampler(Sampler[list[int]]):
    """Batches ``[current-task indices..., replay indices...]`` for steps ``start_step..num_steps-1``.

    Current-task frames are drawn uniformly without replacement within a batch; replay takes
    ``floor(replay_batch_ratio * batch_size)`` slots when the algorithm has anything stored.
    """

    def __init__(
        self,
        current: np.ndarray,
        algorithm: CLAlgorithm,
        batch_size: int,
        *,
        seed: int,
        task: int,
        rank: int,
        start_step: int,
        num_steps: int,
    ) -> None:
        if len(current) == 0:
            raise ValueError(f"Task {task} has no training frames to sample from.")
        self.current = np.asarray(current, dtype=np.int64)
        self.algorithm = algorithm
        self.batch_size = int(batch_size)
        self.seed, self.task, self.rank = int(seed), int(task), int(rank)
        self.start_step, self.num_steps = int(start_step), int(num_steps)

    def __len__(self) -> int:
        # The whole task's length, also when resuming at ``start_step``: Lightning restores its
        # in-epoch batch counter from the checkpoint and would end the epoch ``start_step`` batches
        # early (then replay batches from a fresh iterator) if the length counted only what is left.
        # The fit stops at the task's ``max_steps`` anyway.
        return self.num_steps

    def batch_for_step(self, step: int) -> list[int]:
        rng = np.random.default_rng([_SAMPLER_STREAM, self.seed, self.task, self.rank, step])
        n_replay = math.floor(self.algorithm.replay_batch_ratio * self.batch_size)
        replay = [int(i) for i in self.algorithm.replay_indices(n_replay, rng)] if n_replay > 0 else []
        n_cur = self.batch_size - len(replay)
        cur = rng.choice(self.current, size=n_cur, replace=n_cur > len(self.current))
        return [int(i) for i in cur] + replay

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.num_steps):
            yield self.batch_for_step(step)


class ContinualDataModule(L.LightningDataModule):
    """Serves the loader of the task the loop is on; the loop calls :meth:`set_task` before each fit."""

    def __init__(
        self,
        data: ContinualData,
        algorithm: CLAlgorithm,
        *,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        seed: int,
        steps_per_task: int,
    ) -> None:
        super().__init__()
        self.data = data
        self.algorithm = algorithm
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.steps_per_task = steps_per_task
        self.task = 0
        self.start_step = 0

    def set_task(self, task: int, start_step: int = 0) -> None:
        self.task, self.start_step = task, start_step

    def current_indices(self, task: int) -> np.ndarray:
        """Dataset indices of the frames the algorithm trains on during ``task`` (joint: several tasks)."""
        parts = [self.data.train_dataset(t).frame_indices for t in self.algorithm.training_tasks(task)]
        return np.unique(np.concatenate(parts))

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        sampler = ContinualBatchSampler(
            self.current_indices(self.task),
            self.algorithm,
            self.batch_size,
            seed=self.seed,
            task=self.task,
            rank=self._rank(),
            start_step=self.start_step,
            num_steps=self.steps_per_task,
        )
        return self.loader(self.data.dataset, batch_sampler=sampler)

    def loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        """A DataLoader with the run's workers; it never draws from the global torch RNG."""
        # An explicit generator keeps DataLoader start-up from consuming the global RNG, which the
        # policy's dropout uses: otherwise a resumed run would diverge from an uninterrupted one.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.task)
        kwargs.setdefault("num_workers", self.num_workers)
        if kwargs["num_workers"] > 0:
            kwargs.setdefault("persistent_workers", False)
            kwargs.setdefault("multiprocessing_context", "fork" if _fork_ok() else None)
        return DataLoader(dataset, generator=gen, **kwargs)

    def eval_loader(self, dataset: Dataset, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Sequential held-out batches; under DDP each rank takes every ``world_size``-th batch."""
        indices = list(range(len(dataset)))
        size = self.eval_batch_size
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        return self.loader(dataset, batch_sampler=ListBatchSampler(batches[rank::world_size]))


class ListBatchSampler(Sampler[list[int]]):
    """A batch sampler that yields the given batches of indices, in order (held-out evaluation here,
    PackNet's fine-tuning batches in :mod:`cl_vla.algorithms.packnet`)."""

    def __init__(self, batches: Sequence[list[int]]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def _fork_ok() -> bool:
    import multiprocessing as mp

    return "fork" in mp.get_all_start_methods()
