"""Continual-learning algorithms; see :class:`cl_vla.algorithms.base.CLAlgorithm` for the interface."""

from cl_vla.algorithms.base import CLAlgorithm, TaskContext

__all__ = ["CLAlgorithm", "TaskContext"]
