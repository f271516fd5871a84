"""Experience replay (ER): a per-task reservoir of dataset references mixed into later batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.replay_memory import ReplayMemory, check_task_id, entropy

# SeedSequence pads short entropy with zeros, so ``[seed]`` and ``[seed, 0]`` give the same stream:
# a distinct second word per purpose keeps task 0's reservoir and the sampling stream independent.
_POPULATE_STREAM = 1
_SAMPLE_STREAM = 2

_STATE_VERSION = 1


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

    - **References, not frames.** The buffer (a :class:`~cl_vla.algorithms.replay_memory.ReplayMemory`,
      the memory DER++, MIR, GEM and A-GEM use too) stores ints: for a dataset with ``frame_indices`` (a
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
        self.memory = ReplayMemory(self.buffer_size_per_task, self.seed, stream=_POPULATE_STREAM)
        self._rng = np.random.default_rng([entropy(self.seed), _SAMPLE_STREAM])

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
        task_id = check_task_id(task_id)
        if num_samples is not None and (isinstance(num_samples, bool) or not _is_positive_int(num_samples)):
            raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}.")
        # The public attributes are the hyperparameters (the seed's API lets callers set them).
        self.memory.per_task, self.memory.seed = self.buffer_size_per_task, self.seed
        self.memory.populate(task_id, dataset, num_samples)

    def attach_dataset(self, task_id: int, dataset: Any) -> None:
        """Give a task restored from a checkpoint back the dataset its references point into.

        For references taken from ``frame_indices``, pass the task's dataset (with ``base_dataset``)
        or the shared dataset itself; otherwise the very dataset it was populated from.
        """
        self.memory.attach(task_id, dataset)

    # ---- drawing --------------------------------------------------------------------------------

    def _draw(self, num: int, rng: np.random.Generator, balanced: bool) -> list[tuple[int, int]]:
        """``num`` (task_id, reference) pairs; without replacement wherever the stored items suffice."""
        if num < 0:
            raise ValueError(f"the number of samples to draw must be >= 0, got {num!r}.")
        tasks = self.get_task_ids()
        if num == 0 or not tasks:
            return []
        if not balanced:
            sizes = np.array([self.memory.size(t) for t in tasks])
            flat = rng.choice(int(sizes.sum()), size=num, replace=num > int(sizes.sum()))
            owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            return [
                (tasks[o], int(self.memory.refs(tasks[o])[f - starts[o]]))
                for o, f in zip(owner, flat, strict=True)
            ]
        counts = np.full(len(tasks), num // len(tasks), dtype=np.int64)
        # The remainder goes to distinct tasks picked at random, so no task is favoured by its position.
        counts[rng.choice(len(tasks), size=num % len(tasks), replace=False)] += 1
        pairs: list[tuple[int, int]] = []
        for task_id, count in zip(tasks, counts, strict=True):
            refs = self.memory.refs(task_id)
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
        return [self.memory.item(t, ref) for t, ref in pairs]

    def sample(self, batch_size: int) -> list[dict]:
        """Sample a batch uniformly from all stored tasks; empty list if the buffer is empty."""
        self.memory.require_datasets()
        return self._fetch(self._draw(batch_size, self._rng, balanced=False))

    def sample_balanced(self, batch_size: int) -> list[dict]:
        """Sample a batch with equal representation from each stored task; empty list if empty."""
        self.memory.require_datasets()
        return self._fetch(self._draw(batch_size, self._rng, balanced=True))

    # ---- inspection -----------------------------------------------------------------------------

    def get_task_ids(self) -> list[int]:
        """Stored task ids, ascending."""
        return self.memory.task_ids()

    def get_task_size(self, task_id: int) -> int:
        """Number of samples stored for ``task_id`` (0 if none)."""
        return self.memory.size(task_id)

    def __len__(self) -> int:
        return len(self.memory)

    def memory_bytes(self) -> int:
        """Approximate bytes held for stored samples (8 per reference; frames live in the dataset)."""
        return self.memory.memory_bytes()

    def clear(self) -> None:
        """Forget every stored task and attached dataset; the sampling generator is left as it is."""
        self.memory.clear()

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
            "tasks": self.memory.state_dict(),
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
        tasks = state.get("tasks", {})
        for key, entry in tasks.items():
            expected = state.get("task_sizes", {}).get(key, len(entry["refs"]))
            if int(expected) != len(entry["refs"]):
                raise ValueError(f"task {int(key)} lists {expected} samples but holds {len(entry['refs'])}.")
        self.memory.load_state_dict(tasks)  # validates every entry before replacing anything
        self.buffer_size_per_task = int(state["buffer_size_per_task"])
        self.seed = int(state["seed"])
        self.memory.per_task, self.memory.seed = self.buffer_size_per_task, self.seed
        self.replay_batch_ratio = float(state["replay_batch_ratio"])
        self.balanced_sampling = bool(state["balanced_sampling"])
        self._rng = np.random.default_rng([entropy(self.seed), _SAMPLE_STREAM])
        if "rng_state" in state:
            self._rng.bit_generator.state = _rng_state_from_json(state["rng_state"])

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(buffer_size_per_task={self.buffer_size_per_task}, seed={self.seed}, "
            f"replay_batch_ratio={self.replay_batch_ratio}, balanced_sampling={self.balanced_sampling}, "
            f"tasks={ {t: self.get_task_size(t) for t in self.get_task_ids()} })"
        )


__all__ = ["ReplayBuffer"]
