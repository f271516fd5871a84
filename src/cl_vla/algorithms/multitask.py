"""Joint training on every task seen so far: the usual upper bound for continual learning."""

from __future__ import annotations

from cl_vla.algorithms.sequential import Sequential


class Multitask(Sequential):
    """At task ``t`` train on the union of tasks ``0..t``; every other hook is :class:`Sequential`'s.

    The loop builds the training stream from :meth:`training_tasks`, so the widening needs no
    replay buffer and no special case in the loop.
    """

    name = "multitask"

    def training_tasks(self, task_id: int) -> list[int]:
        """All tasks up to and including ``task_id``."""
        if isinstance(task_id, bool) or int(task_id) != task_id or task_id < 0:
            raise ValueError(f"task_id must be a non-negative int, got {task_id!r}.")
        return list(range(int(task_id) + 1))


__all__ = ["Multitask"]
