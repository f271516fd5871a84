"""Experience replay (ER): a per-task reservoir of dataset references mixed into later batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cl_vla.algorithms.base import CLAlgorithm, TaskContext

# SeedSequence pads short entropy with zeros, so ``[seed]`` and ``[seed, 0]`` give the same stream:
# a distinct second word per purpose keeps task 0's reservoir and the sampling stream independent.
_POPULATE_STREAM = 1
_SAMPLE_STREAM = 2

# How a task's references are to be read back (stored in the state so a resume knows).
_KIND_FRAME_INDICES = "frame_indices"  # global indices into ``dataset.base_dataset``
_KIND_POSITIONS = "positions"  # positions into the dataset handed to populate_from_dataset

_STATE_VERSION = 1


def _entropy(seed: int) -> int:
    # SeedSequence rejects negative entropy; configs may still carry a negative seed.
    return int(seed) % (1 << 64)


def _is_positive_int(value: Any) -> bool:
    try:
        return int(value) == value and int(value) > 0
    except (TypeError, ValueError):
        return False


def _rng_state_to_json(state: Mapping[str, Any]) -> dict[str, Any]:
    # PCG64's 128-bit ints survive Python's json but not readers that parse numbers as doubles.
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            out[key] = _rng_state_to_json(value)
        elif isinstance(value, int | np.integer) and not isinstance(value, bool):
            out[key] = {"int": str(int(value))}
        else:
            out[key] = value
    return out


def _rng_state_from_json(state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping) and set(value) == {"int"}:
            out[key] = int(value["int"])
        elif isinstance(value, Mapping):
            out[key] = _rng_state_from_json(value)
        else:
            out[key] = value
    return out


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


class ReplayBuffer(CLAlgorithm):
    """Experience Replay buffer that stores samples from past tasks.

    Uses reservoir sampling to keep at most ``buffer_size_per_task`` samples per task; during training
    samples from the buffer are mixed with current-task data at ``replay_batch_ratio``. The buffer is
    filled once per task, at its end (:meth:`on_task_end` calls :meth:`populate_from_dataset`), so
    :meth:`observe` is a no-op.

    Usage::

        buffer = ReplayBuffer(buffer_size_per_task=500)
        buffer.populate_from_dataset(task_id=0, dataset=task0_dataset)   # after task 0
        replay_samples = buffer.sample(batch_size=4)                      # list[dict], during task 1

    Differences from the seed's ``ReplayBuffer`` (same names, arguments and defaults), and why:

    - **References, not frames.** The buffer stores ints: for a dataset with ``frame_indices`` (a
      ``TaskFilteredDataset``) the global indices into ``dataset.base_dataset``, otherwise positions
      into the dataset itself. Populating never decodes a frame; the loop's batch sampler gets the
      references from :meth:`replay_indices` and the DataLoader's workers decode them like any other
      sample. :meth:`sample` still returns ``list[dict]`` by fetching the referenced items.
    - **Real reservoir sampling** (Algorithm R) instead of a seeded shuffle, with a generator seeded by
      ``(seed, task_id)`` only, so every DDP rank builds the same buffer without communicating.
    - **Balanced sampling covers every task.** Each stored task gets ``floor(num / T)`` samples and the
      remainder goes to tasks drawn at random without replacement; the seed took one sample per task
      and truncated, so with more tasks than slots only the first tasks were ever replayed.
    - **Exact checkpoints.** :meth:`state_dict` holds the references, sizes, hyperparameters and the
      sampling generator's state (JSON only, ~8 bytes per stored sample), so a resume re-samples
      nothing. The dataset objects are not serialized: after :meth:`load_state_dict`, re-attach them
      with :meth:`attach_dataset` before calling :meth:`sample` (:meth:`replay_indices` needs none).
    - **on_task_end populates** from ``context.train_dataset``, so the loop needs no ER special case.

    Args:
        buffer_size_per_task: Maximum number of samples stored per task.
        seed: Random seed for reproducibility.
        replay_batch_ratio: Fraction of each training batch drawn from the buffer, in [0, 1).
        balanced_sampling: Equal samples per task in :meth:`replay_indices` instead of uniform.
    """

    name = "er"

    def __init__(
        self,
        buffer_size_per_task: int = 500,
        seed: int = 42,
        replay_batch_ratio: float = 0.3,
        balanced_sampling: bool = False,
    ) -> None:
        self._check_hparams(buffer_size_per_task, replay_batch_ratio)
        self.buffer_size_per_task = int(buffer_size_per_task)
        self.seed = int(seed)
        self.replay_batch_ratio = float(replay_batch_ratio)
        self.balanced_sampling = bool(balanced_sampling)
        self._refs: dict[int, np.ndarray] = {}
        self._kinds: dict[int, str] = {}
        self._datasets: dict[int, Any] = {}
        self._rng = np.random.default_rng([_entropy(self.seed), _SAMPLE_STREAM])

    @staticmethod
    def _check_hparams(buffer_size_per_task: int, replay_batch_ratio: float) -> None:
        if isinstance(buffer_size_per_task, bool) or not _is_positive_int(buffer_size_per_task):
            raise ValueError(f"buffer_size_per_task must be a positive int, got {buffer_size_per_task!r}.")
        try:
            ratio_ok = 0.0 <= float(replay_batch_ratio) < 1.0
        except (TypeError, ValueError):
            ratio_ok = False
        if not ratio_ok:
            raise ValueError(f"replay_batch_ratio must be in [0, 1), got {replay_batch_ratio!r}.")

    # ---- filling --------------------------------------------------------------------------------

    def populate_from_dataset(self, task_id: int, dataset: Any, num_samples: int | None = None) -> None:
        """Store up to ``num_samples`` (default ``buffer_size_per_task``) references by reservoir sampling.

        Populating a task again replaces its entry. Only ``len(dataset)`` and ``dataset.frame_indices``
        are read; no item is decoded.
        """
        task_id = self._check_task_id(task_id)
        if num_samples is not None and (isinstance(num_samples, bool) or not _is_positive_int(num_samples)):
            raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}.")
        k = self.buffer_size_per_task if num_samples is None else int(num_samples)
        frame_indices = getattr(dataset, "frame_indices", None)
        if frame_indices is not None:
            stream = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
            kind = _KIND_FRAME_INDICES
        else:
            stream = np.arange(len(dataset), dtype=np.int64)
            kind = _KIND_POSITIONS
        if len(stream) == 0:
            raise ValueError(
                f"cannot populate task {task_id} from an empty dataset; it needs at least 1 item."
            )
        rng = np.random.default_rng([_entropy(self.seed), _POPULATE_STREAM, task_id])
        self._refs[task_id] = reservoir_sample(stream, k, rng)
        self._kinds[task_id] = kind
        self._datasets[task_id] = dataset

    def attach_dataset(self, task_id: int, dataset: Any) -> None:
        """Give a task restored from a checkpoint back the dataset its references point into.

        For references taken from ``frame_indices``, pass the task's dataset (with ``base_dataset``)
        or the shared dataset itself; otherwise the very dataset it was populated from.
        """
        task_id = self._check_task_id(task_id)
        if task_id not in self._refs:
            raise KeyError(
                f"task {task_id} has no stored references; stored tasks are {self.get_task_ids()}."
            )
        self._check_fits(task_id, dataset)
        self._datasets[task_id] = dataset

    def _source(self, task_id: int, dataset: Any) -> Any:
        if self._kinds[task_id] == _KIND_FRAME_INDICES:
            return getattr(dataset, "base_dataset", dataset)
        return dataset

    def _check_fits(self, task_id: int, dataset: Any) -> None:
        source = self._source(task_id, dataset)
        refs = self._refs[task_id]
        if hasattr(source, "__len__") and len(refs) and int(refs.max()) >= len(source):
            raise ValueError(
                f"dataset for task {task_id} has {len(source)} items but the stored references reach "
                f"{int(refs.max())}; attach the dataset the task was populated from."
            )

    @staticmethod
    def _check_task_id(task_id: int) -> int:
        if isinstance(task_id, bool) or int(task_id) != task_id or int(task_id) < 0:
            raise ValueError(f"task_id must be a non-negative int, got {task_id!r}.")
        return int(task_id)

    # ---- drawing --------------------------------------------------------------------------------

    def _draw(self, num: int, rng: np.random.Generator, balanced: bool) -> list[tuple[int, int]]:
        """``num`` (task_id, reference) pairs; without replacement wherever the stored items suffice."""
        if num < 0:
            raise ValueError(f"the number of samples to draw must be >= 0, got {num!r}.")
        tasks = self.get_task_ids()
        if num == 0 or not tasks:
            return []
        if not balanced:
            sizes = np.array([len(self._refs[t]) for t in tasks])
            flat = rng.choice(int(sizes.sum()), size=num, replace=num > int(sizes.sum()))
            owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            return [
                (tasks[o], int(self._refs[tasks[o]][f - starts[o]])) for o, f in zip(owner, flat, strict=True)
            ]
        counts = np.full(len(tasks), num // len(tasks), dtype=np.int64)
        # The remainder goes to distinct tasks picked at random, so no task is favoured by its position.
        counts[rng.choice(len(tasks), size=num % len(tasks), replace=False)] += 1
        pairs: list[tuple[int, int]] = []
        for task_id, count in zip(tasks, counts, strict=True):
            refs = self._refs[task_id]
            picks = rng.choice(len(refs), size=int(count), replace=int(count) > len(refs))
            pairs.extend((task_id, int(refs[p])) for p in picks)
        # Task-grouped order would let a caller that truncates the batch drop the last tasks.
        return [pairs[i] for i in rng.permutation(len(pairs))]

    def replay_indices(self, num: int, rng: np.random.Generator) -> list[int]:
        """``num`` stored references, uniform over all stored or balanced across tasks.

        References are global indices into the shared dataset for tasks populated from a dataset with
        ``frame_indices`` (the loop's case), positions into the task's dataset otherwise.
        """
        return [ref for _, ref in self._draw(num, rng, self.balanced_sampling)]

    def _fetch(self, pairs: list[tuple[int, int]]) -> list[dict]:
        return [self._source(t, self._datasets[t])[ref] for t, ref in pairs]

    def _require_datasets(self) -> None:
        missing = [t for t in self.get_task_ids() if t not in self._datasets]
        if missing:
            raise RuntimeError(
                f"no dataset attached for task(s) {missing} restored from a checkpoint; call "
                "attach_dataset(task_id, dataset) for each before sample()."
            )

    def sample(self, batch_size: int) -> list[dict]:
        """Sample a batch uniformly from all stored tasks; empty list if the buffer is empty."""
        self._require_datasets()
        return self._fetch(self._draw(batch_size, self._rng, balanced=False))

    def sample_balanced(self, batch_size: int) -> list[dict]:
        """Sample a batch with equal representation from each stored task; empty list if empty."""
        self._require_datasets()
        return self._fetch(self._draw(batch_size, self._rng, balanced=True))

    # ---- inspection -----------------------------------------------------------------------------

    def get_task_ids(self) -> list[int]:
        """Stored task ids, ascending."""
        return sorted(self._refs)

    def get_task_size(self, task_id: int) -> int:
        """Number of samples stored for ``task_id`` (0 if none)."""
        refs = self._refs.get(int(task_id))
        return 0 if refs is None else len(refs)

    def __len__(self) -> int:
        return sum(len(r) for r in self._refs.values())

    def memory_bytes(self) -> int:
        """Approximate bytes held for stored samples (8 per reference; frames live in the dataset)."""
        return int(sum(r.nbytes for r in self._refs.values()))

    def clear(self) -> None:
        """Forget every stored task and attached dataset; the sampling generator is left as it is."""
        self._refs.clear()
        self._kinds.clear()
        self._datasets.clear()

    # ---- hooks ----------------------------------------------------------------------------------

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """No-op: ER populates from the whole task dataset at task end, not per step."""

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """Fill the buffer for ``task_id`` from ``context.train_dataset`` (nothing without one)."""
        if context is not None and context.train_dataset is not None:
            self.populate_from_dataset(task_id, context.train_dataset)

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable snapshot: hyperparameters, references and sizes per task, generator state."""
        return {
            "name": self.name,
            "version": _STATE_VERSION,
            "buffer_size_per_task": self.buffer_size_per_task,
            "seed": self.seed,
            "replay_batch_ratio": self.replay_batch_ratio,
            "balanced_sampling": self.balanced_sampling,
            "tasks": {
                str(t): {"kind": self._kinds[t], "refs": self._refs[t].tolist()} for t in self.get_task_ids()
            },
            "task_sizes": {str(t): self.get_task_size(t) for t in self.get_task_ids()},
            "rng_state": _rng_state_to_json(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot exactly; datasets of tasks it holds stay attached."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state is for algorithm {state.get('name')!r}, not {self.name!r}.")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"unsupported ReplayBuffer state version {state.get('version')!r}; expected 1.")
        self._check_hparams(state["buffer_size_per_task"], state["replay_batch_ratio"])
        refs: dict[int, np.ndarray] = {}
        kinds: dict[int, str] = {}
        for key, entry in state.get("tasks", {}).items():
            task_id = self._check_task_id(int(key))
            if entry["kind"] not in (_KIND_FRAME_INDICES, _KIND_POSITIONS):
                raise ValueError(f"unknown reference kind {entry['kind']!r} for task {task_id}.")
            refs[task_id] = np.asarray(entry["refs"], dtype=np.int64).reshape(-1)
            kinds[task_id] = entry["kind"]
            expected = state.get("task_sizes", {}).get(key, len(refs[task_id]))
            if int(expected) != len(refs[task_id]):
                raise ValueError(f"task {task_id} lists {expected} samples but holds {len(refs[task_id])}.")
        self.buffer_size_per_task = int(state["buffer_size_per_task"])
        self.seed = int(state["seed"])
        self.replay_batch_ratio = float(state["replay_batch_ratio"])
        self.balanced_sampling = bool(state["balanced_sampling"])
        self._rng = np.random.default_rng([_entropy(self.seed), _SAMPLE_STREAM])
        if "rng_state" in state:
            self._rng.bit_generator.state = _rng_state_from_json(state["rng_state"])
        # A dataset attached before loading stays usable only for a task the state still holds.
        datasets = {t: d for t, d in self._datasets.items() if t in refs and self._kinds.get(t) == kinds[t]}
        self._refs, self._kinds, self._datasets = refs, kinds, {}
        for task_id, dataset in datasets.items():
            self._check_fits(task_id, dataset)
            self._datasets[task_id] = dataset

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(buffer_size_per_task={self.buffer_size_per_task}, seed={self.seed}, "
            f"replay_batch_ratio={self.replay_batch_ratio}, balanced_sampling={self.balanced_sampling}, "
            f"tasks={ {t: self.get_task_size(t) for t in self.get_task_ids()} })"
        )


__all__ = ["ReplayBuffer", "reservoir_sample"]
