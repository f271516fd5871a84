"""Continual-learning algorithms; see :class:`cl_vla.algorithms.base.CLAlgorithm` for the interface."""

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.er import ReplayBuffer
from cl_vla.algorithms.multitask import Multitask
from cl_vla.algorithms.sequential import Sequential

__all__ = ["CLAlgorithm", "Multitask", "ReplayBuffer", "Sequential", "TaskContext"]
