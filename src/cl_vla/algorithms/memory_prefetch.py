"""Memory batches decoded ahead of the step that uses them, in the run's DataLoader workers.

GEM, A-GEM and MIR read frames from their memory at every step, inside ``after_backward``. Decoded
there, in the main process, those frames stall the step: A-GEM spent 0.58 s of a 1.43 s step decoding
its memory batch (tiny_vla, batch 32, PNG frames). The frames a step reads are a pure function of the
run's seed, the rank and the step counter, so the batches of the coming steps can be drawn and decoded
by worker processes while the main process computes: :class:`MemoryPrefetcher` serves ``load(step)``
from such workers, in step order, with exactly what a direct ``load(step)`` would return.

The workers see the algorithm as it was when they started; a prefetcher therefore restarts whenever its
``key`` (the memory's content and the draw settings) changes, and at every task boundary.

Extra worker processes only pay where a core is free for them. On a 2-core CPU run (2 torch threads, 2
loader workers) they compete with the step's own threads: A-GEM measured 2.13x of ``sequential``'s step
time with its memory decoded in 2 more workers against 1.73x decoded inside the step, MIR 2.70x against
2.18x (``python -m cl_vla.bench``, tiny_vla, batch 32, 2026-12-03). :func:`memory_workers` makes that
choice (``data.memory_workers``, default ``auto``); the frames are the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

#: A gap larger than this between the step asked for and the next prefetched one restarts the workers
#: instead of decoding (and dropping) every batch in between.
_MAX_SKIP = 4


def memory_workers(
    setting: Any, loader_workers: int, accelerated: bool, cores: int | None = None, threads: int | None = None
) -> int:
    """Worker processes that decode memory batches ahead (0: in the step, in the main process).

    ``setting`` is ``data.memory_workers``: an int >= 0, or ``"auto"``: as many as the run's loader
    (``loader_workers``) when the cores left after the loader's workers and the main process's compute
    (its torch threads on a CPU run, one core when an accelerator computes) can hold that many more,
    else 0. ``cores`` and ``threads`` default to this process's CPU affinity and torch threads.
    """
    if setting == "auto":
        if loader_workers <= 0:
            return 0
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        compute = 1 if accelerated else (threads if threads is not None else torch.get_num_threads())
        return loader_workers if cores - loader_workers - compute >= loader_workers else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"data.memory_workers must be 'auto' or an int >= 0, got {setting!r}.")
    return setting


class StepBatches(IterableDataset):
    """``(step, load(step))`` for ``step = start, start + 1, ...``, split round-robin over the workers,
    which a DataLoader with ``batch_size=None`` yields back in step order."""

    def __init__(self, load: Callable[[int], Any], start: int) -> None:
        self.load, self.start = load, int(start)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + worker
        while True:
            yield step, self.load(step)
            step += workers


class MemoryPrefetcher:
    """``get(step, key)`` returns ``load(step)``, decoded ahead by ``make_loader``'s workers.

    ``make_loader(dataset, **kwargs)`` is the run's loader factory (``TaskContext.make_loader``); when it
    is missing or has no workers, or ``workers`` is 0, ``load`` runs in the calling process, as before
    prefetching existed. ``workers`` (``TaskContext.memory_workers``) overrides the factory's worker
    count; None keeps it. ``key`` identifies everything ``load`` reads besides the step: a new key
    restarts the workers.
    """

    def __init__(self, load: Callable[[int], Any]) -> None:
        self.load = load
        self._make_loader: Callable[..., Iterable[Any]] | None = None
        self._workers: int | None = None
        self._batches: Iterator[tuple[int, Any]] | None = None
        self._key: Hashable = None
        self._next_step = 0
        self._last: tuple[int, Any] | None = None

    def use_loader(
        self, make_loader: Callable[..., Iterable[Any]] | None, workers: int | None = None
    ) -> None:
        """Prefetch through ``make_loader`` (with ``workers`` processes unless None) from now on
        (restarts any running workers)."""
        self.close()
        self._make_loader, self._workers = make_loader, workers

    def close(self) -> None:
        """Stop the workers (a DataLoader iterator shuts its workers down when dropped)."""
        self._batches, self._last, self._key = None, None, None

    def get(self, step: int, key: Hashable) -> Any:
        """What ``load(step)`` returns for the algorithm in the state ``key`` identifies."""
        if self._last is not None and self._last[0] == step and self._key == key:
            return self._last[1]  # the same step asked again (a step retried after a failure)
        running = self._batches is not None and key == self._key
        if not (running and 0 <= step - self._next_step <= _MAX_SKIP) and not self._start(step, key):
            return self.load(step)
        assert self._batches is not None
        while True:
            got, batch = next(self._batches)
            self._next_step = got + 1
            if got == step:
                self._last = (got, batch)
                return batch

    def _start(self, step: int, key: Hashable) -> bool:
        self.close()
        if self._make_loader is None or self._workers == 0:
            return False
        kwargs = {} if self._workers is None else {"num_workers": self._workers}
        loader = self._make_loader(StepBatches(self.load, step), batch_size=None, **kwargs)
        if not isinstance(loader, DataLoader) or loader.num_workers == 0:
            return False
        self._batches, self._key, self._next_step = iter(loader), key, step
        return True

    def __getstate__(self) -> dict[str, Any]:
        # Workers and loader factories stay with the process that made them (deepcopy, pickling).
        return {**self.__dict__, "_make_loader": None, "_batches": None, "_last": None, "_key": None}


__all__ = ["MemoryPrefetcher", "StepBatches", "memory_workers"]
