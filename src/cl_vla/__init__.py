"""cl_vla: continual learning for vision-language-action robot policies.

Like the seed, the top level re-exports :class:`CLAlgorithm` and :class:`ReplayBuffer` so old import
paths keep working; everything else is imported from its subpackage, which keeps ``import cl_vla``
light (no Lightning, Hydra or lerobot at import time).
"""

from cl_vla.algorithms.base import CLAlgorithm
from cl_vla.algorithms.er import ReplayBuffer

__version__ = "0.1.0"

__all__ = ["CLAlgorithm", "ReplayBuffer", "__version__"]
