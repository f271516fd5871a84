"""Joint training on every task seen so far: the usual upper bound for continual learning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.sequential import _check_state_name


class Multitask(CLAlgorithm):
    """At task ``t`` train on the union of tasks ``0..t``; otherwise neutral like :class:`Sequential`.

    The loop builds the training stream from :meth:`training_tasks`, so the widening needs no
    replay buffer and no special case in the loop.
    """

    name = "multitask"

    def training_tasks(self, task_id: int) -> list[int]:
        """All tasks up to and including ``task_id``."""
        if isinstance(task_id, bool) or int(task_id) != task_id or task_id < 0:
            raise ValueError(f"task_id must be a non-negative int, got {task_id!r}.")
        return list(range(int(task_id) + 1))

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """No-op."""

    def sample(self, batch_size: int) -> list[dict]:
        """Nothing to mix in: always an empty list."""
        return []

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, Any]:
        """Only the name, so a checkpoint records which algorithm wrote it."""
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore; rejects another algorithm's state."""
        _check_state_name(state, self.name)


__all__ = ["Multitask"]
