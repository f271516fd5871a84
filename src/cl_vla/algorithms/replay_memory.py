"""The one replay memory of every replay-based algorithm (ER, DER++, MIR, GEM, A-GEM).

A :class:`ReplayMemory` keeps, per finished task, a reservoir sample of *references* (ints), never
frames: for a dataset with ``frame_indices`` (a ``TaskFilteredDataset``) global indices into its
``base_dataset``, for any other dataset positions into itself. Populating decodes nothing; the frames
are read back through the DataLoader's workers (ER, DER++) or a memory batch (GEM, A-GEM, MIR).

The selection is Algorithm R seeded by ``(seed, stream, task)`` only, so every DDP rank holds the same
memory without communicating. The state is the references and their kind per task (JSON only, ~8
bytes per stored frame); the datasets are re-attached after a restore (:meth:`ReplayMemory.attach`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

# How a task's references are to be read back (stored in the state so a resume knows).
KIND_FRAME_INDICES = "frame_indices"  # global indices into ``dataset.base_dataset``
KIND_POSITIONS = "positions"  # positions into the dataset handed to ``populate``


def entropy(seed: int) -> int:
    """``seed`` as SeedSequence entropy (it rejects negative values; configs may carry one)."""
    return int(seed) % (1 << 64)


def check_task_id(task_id: Any) -> int:
    """``task_id`` as an int, or one sentence saying it must be a non-negative int."""
    ok = not isinstance(task_id, bool)
    try:
        ok = ok and int(task_id) == task_id and int(task_id) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"task_id must be a non-negative int, got {task_id!r}.")
    return int(task_id)


def reservoir_sample(stream: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Algorithm R (Vitter, 1985): a uniform ``k``-subset of ``stream`` taken in one pass, in order.

    Item ``i`` (0-based, ``i >= k``) replaces slot ``j ~ U{0..i}`` when ``j < k``. The ``n - k`` draws
    are made in one vectorized call, which consumes the generator exactly as ``n - k`` successive
    scalar draws would, so the result is the textbook algorithm's, only faster on long streams.
    """
    n = len(stream)
    if n <= k:
        return stream.astype(np.int64, copy=True)
    reservoir = stream[:k].astype(np.int64, copy=True)
    slots = rng.integers(0, np.arange(k + 1, n + 1, dtype=np.int64))
    # Later replacements overwrite earlier ones, so the in-order loop over the hits is required.
    for offset in np.flatnonzero(slots < k):
        reservoir[slots[offset]] = stream[k + offset]
    return reservoir


class ReplayMemory:
    """Per-task reservoir samples of dataset references, exact to checkpoint.

    Args:
        per_task: Default number of references kept per task.
        seed: Seeds the selection (with ``stream`` and the task id).
        stream: A second SeedSequence word per algorithm family, so two algorithms with one seed
            select independently (ER keeps 1, GEM 11: the values their memories always used).
    """

    def __init__(self, per_task: int, seed: int, stream: int) -> None:
        self.per_task = int(per_task)
        self.seed = int(seed)
        self.stream = int(stream)
        self._refs: dict[int, np.ndarray] = {}
        self._kinds: dict[int, str] = {}
        self._datasets: dict[int, Any] = {}
        #: Bumped by every change of what the memory holds or reads from: copies of the memory made
        #: earlier (prefetch workers, :mod:`cl_vla.algorithms.memory_prefetch`) are stale once it moves.
        self.version = 0

    # ---- filling --------------------------------------------------------------------------------

    def populate(self, task_id: int, dataset: Any, num: int | None = None) -> None:
        """Select up to ``num`` (default ``per_task``) references of ``dataset``, replacing any earlier."""
        task_id = check_task_id(task_id)
        frame_indices = getattr(dataset, "frame_indices", None)
        if frame_indices is not None:
            stream, kind = np.asarray(frame_indices, dtype=np.int64).reshape(-1), KIND_FRAME_INDICES
        else:
            stream, kind = np.arange(len(dataset), dtype=np.int64), KIND_POSITIONS
        if len(stream) == 0:
            raise ValueError(
                f"cannot populate task {task_id} from an empty dataset; it needs at least 1 item."
            )
        rng = np.random.default_rng([entropy(self.seed), self.stream, task_id])
        self._refs[task_id] = reservoir_sample(stream, self.per_task if num is None else int(num), rng)
        self._kinds[task_id] = kind
        self._datasets[task_id] = dataset
        self.version += 1

    def attach(self, task_id: int, dataset: Any) -> None:
        """Give a task restored from a checkpoint the dataset its references point into.

        For references taken from ``frame_indices``, pass the task's dataset (with ``base_dataset``)
        or the shared dataset itself; otherwise the very dataset it was populated from.
        """
        task_id = check_task_id(task_id)
        if task_id not in self._refs:
            raise KeyError(f"task {task_id} has no stored references; stored tasks are {self.task_ids()}.")
        self._check_fits(task_id, dataset)
        self._datasets[task_id] = dataset
        self.version += 1

    def _check_fits(self, task_id: int, dataset: Any) -> None:
        source = self._source(task_id, dataset)
        refs = self._refs[task_id]
        if hasattr(source, "__len__") and len(refs) and int(refs.max()) >= len(source):
            raise ValueError(
                f"dataset for task {task_id} has {len(source)} items but the stored references reach "
                f"{int(refs.max())}; attach the dataset the task was populated from."
            )

    def _source(self, task_id: int, dataset: Any) -> Any:
        if self._kinds[task_id] == KIND_FRAME_INDICES:
            return getattr(dataset, "base_dataset", dataset)
        return dataset

    def clear(self) -> None:
        """Forget every stored task and attached dataset."""
        self._refs.clear()
        self._kinds.clear()
        self._datasets.clear()
        self.version += 1

    # ---- reading --------------------------------------------------------------------------------

    def task_ids(self) -> list[int]:
        """Stored task ids, ascending."""
        return sorted(self._refs)

    def size(self, task_id: int) -> int:
        """References stored for ``task_id`` (0 if none)."""
        refs = self._refs.get(int(task_id))
        return 0 if refs is None else len(refs)

    def __len__(self) -> int:
        return sum(len(r) for r in self._refs.values())

    def refs(self, task_id: int) -> np.ndarray:
        """The stored references of ``task_id`` (read-only view; callers must not write to it)."""
        view = self._refs[int(task_id)].view()
        view.flags.writeable = False
        return view

    def memory_bytes(self) -> int:
        """Bytes held: 8 per reference (the frames stay in the dataset)."""
        return int(sum(r.nbytes for r in self._refs.values()))

    def require_datasets(self) -> None:
        """One sentence when a restored task has no dataset attached yet."""
        missing = [t for t in self.task_ids() if t not in self._datasets]
        if missing:
            raise RuntimeError(
                f"no dataset attached for task(s) {missing} restored from a checkpoint; call "
                "attach_dataset(task_id, dataset) for each first."
            )

    def item(self, task_id: int, ref: int) -> Any:
        """The frame a reference of ``task_id`` points to, decoded by its dataset."""
        return self._source(task_id, self._datasets[task_id])[ref]

    def subset(self, pairs: Sequence[tuple[int, int]]) -> Dataset:
        """The items at ``(task_id, reference)`` pairs, in order, as one dataset."""
        self.require_datasets()
        parts: list[Dataset] = []
        for task_id, ref in pairs:
            source = self._source(task_id, self._datasets[task_id])
            # Consecutive items of one task go into one Subset; ConcatDataset keeps the given order.
            if parts and isinstance(parts[-1], Subset) and parts[-1].dataset is source:
                parts[-1].indices.append(int(ref))
            else:
                parts.append(Subset(source, [int(ref)]))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{task: {"kind", "refs"}}``: plain values only."""
        return {str(t): {"kind": self._kinds[t], "refs": self._refs[t].tolist()} for t in self.task_ids()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly; a dataset attached to a kept task stays attached."""
        refs: dict[int, np.ndarray] = {}
        kinds: dict[int, str] = {}
        for key, entry in state.items():
            task_id = check_task_id(int(key))
            if entry["kind"] not in (KIND_FRAME_INDICES, KIND_POSITIONS):
                raise ValueError(f"unknown reference kind {entry['kind']!r} for task {task_id}.")
            refs[task_id] = np.asarray(entry["refs"], dtype=np.int64).reshape(-1)
            kinds[task_id] = entry["kind"]
        # An attached dataset stays only where the restored task still reads from the same kind.
        keep = {t: d for t, d in self._datasets.items() if t in refs and self._kinds.get(t) == kinds[t]}
        self._refs, self._kinds, self._datasets = refs, kinds, {}
        for task_id, dataset in keep.items():
            self._check_fits(task_id, dataset)
            self._datasets[task_id] = dataset
        self.version += 1


__all__ = [
    "KIND_FRAME_INDICES",
    "KIND_POSITIONS",
    "ReplayMemory",
    "check_task_id",
    "entropy",
    "reservoir_sample",
]
