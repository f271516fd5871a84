"""Memory batches decoded ahead of the step that uses them, in the run's DataLoader workers.

GEM, A-GEM and MIR read frames from their memory at every step, inside ``after_backward``. Decoded
there, in the main process, those frames stall the step: A-GEM spent 0.58 s of a 1.43 s step decoding
its memory batch (tiny_vla, batch 32, PNG frames). The frames a step reads are a pure function of the
run's seed, the rank and the step counter, so the batches of the coming steps can be drawn and decoded
by worker processes while the main process computes: :class:`MemoryPrefetcher` serves ``load(step)``
from such workers, in step order, with exactly what a direct ``load(step)`` would return.

The workers see the algorithm as it was when they started; a prefetcher therefore restarts whenever its
``key`` (the memory's content and the draw settings) changes, and at every task boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

#: A gap larger than this between the step asked for and the next prefetched one restarts the workers
#: instead of decoding (and dropping) every batch in between.
_MAX_SKIP = 4


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
    is missing or has no workers, ``load`` runs in the calling process, as before prefetching existed.
    ``key`` identifies everything ``load`` reads besides the step: a new key restarts the workers.
    """

    def __init__(self, load: Callable[[int], Any]) -> None:
        self.load = load
        self._make_loader: Callable[..., Iterable[Any]] | None = None
        self._batches: Iterator[tuple[int, Any]] | None = None
        self._key: Hashable = None
        self._next_step = 0
        self._last: tuple[int, Any] | None = None

    def use_loader(self, make_loader: Callable[..., Iterable[Any]] | None) -> None:
        """Prefetch through ``make_loader`` from now on (restarts any running workers)."""
        self.close()
        self._make_loader = make_loader

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
        if self._make_loader is None:
            return False
        loader = self._make_loader(StepBatches(self.load, step), batch_size=None)
        if not isinstance(loader, DataLoader) or loader.num_workers == 0:
            return False
        self._batches, self._key, self._next_step = iter(loader), key, step
        return True

    def __getstate__(self) -> dict[str, Any]:
        # Workers and loader factories stay with the process that made them (deepcopy, pickling).
        return {**self.__dict__, "_make_loader": None, "_batches": None, "_last": None, "_key": None}


__all__ = ["MemoryPrefetcher", "StepBatches"]
