"""Continual-learning algorithms; see :class:`cl_vla.algorithms.base.CLAlgorithm` for the interface.

Each algorithm is one module here plus its YAML in ``conf/algorithm/``: ``sequential``,
``multitask``, ``er``, ``der`` (DER++, ``derpp.yaml``), ``mir``, ``gem``, ``agem``, ``ewc``
(``ewc.yaml`` and ``ewc_online.yaml``), ``si``, ``lwf``, ``packnet`` and ``lora`` (per-task LoRA,
``lora_per_task.yaml``). The other modules are helpers they share, named for what they hold:
``base`` (the interface, :func:`~cl_vla.algorithms.base.rank_and_world`,
:func:`~cl_vla.algorithms.base.to_device`), ``parameters`` (which parameters train),
``replay_memory`` (the per-task reservoir of dataset references behind ER, DER++, MIR, GEM and
A-GEM), ``gradient_projection`` (flat gradients and GEM's projection), ``fisher`` (EWC's squared
gradients), ``quadratic_penalty`` (EWC's and SI's penalty) and ``packnet_masks`` (PackNet's owner
masks). (``peft`` is imported only when a LoRA adapter is actually built.)
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
