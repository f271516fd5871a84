"""TinyVLA: a small, CPU-trainable vision-language-action policy registered as lerobot's "tiny_vla".

Only the configuration is imported eagerly (that is what registers the type); lerobot imports
``modeling_tiny_vla`` and ``processor_tiny_vla`` lazily by naming convention, and so can callers.
"""

from cl_vla.policies.tiny_vla.configuration_tiny_vla import TinyVLAConfig

__all__ = ["TinyVLAConfig"]
