"""Continual-learning algorithms; see :class:`cl_vla.algorithms.base.CLAlgorithm` for the interface.

Each algorithm is one module here plus one YAML in ``conf/algorithm/``. (``peft`` is imported only
when a LoRA adapter is actually built.)
"""

from cl_vla.algorithms.agem import AGEM
from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.der import DERpp
from cl_vla.algorithms.er import ReplayBuffer
from cl_vla.algorithms.ewc import EWC
from cl_vla.algorithms.gem import GEM
from cl_vla.algorithms.lora import PerTaskLoRA
from cl_vla.algorithms.lwf import LwF
from cl_vla.algorithms.mir import MIR
from cl_vla.algorithms.multitask import Multitask
from cl_vla.algorithms.packnet import PackNet
from cl_vla.algorithms.sequential import Sequential
from cl_vla.algorithms.si import SI

__all__ = [
    "AGEM",
    "EWC",
    "GEM",
    "MIR",
    "SI",
    "CLAlgorithm",
    "DERpp",
    "LwF",
    "Multitask",
    "PackNet",
    "PerTaskLoRA",
    "ReplayBuffer",
    "Sequential",
    "TaskContext",
]
