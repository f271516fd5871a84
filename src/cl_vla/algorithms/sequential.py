"""Plain sequential fine-tuning: the no-CL baseline (the lower bound on forgetting)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cl_vla.algorithms.base import CLAlgorithm, TaskContext


def _check_state_name(state: Mapping[str, Any], name: str) -> None:
    # Loading another algorithm's state would silently drop it; a mismatch is a config error.
    if state.get("name", name) != name:
        raise ValueError(f"state is for algorithm {state.get('name')!r}, not {name!r}.")


class Sequential(CLAlgorithm):
    """Fine-tune on each task in turn with nothing against forgetting: every hook is neutral."""

    name = "sequential"

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """No-op."""

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """No-op."""

    def state_dict(self) -> dict[str, Any]:
        """Only the name, so a checkpoint records which algorithm wrote it."""
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore; rejects another algorithm's state."""
        _check_state_name(state, self.name)


__all__ = ["Sequential"]
