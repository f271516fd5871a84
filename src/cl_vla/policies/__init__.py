"""Policies cl_vla adds to lerobot; importing this package registers them with lerobot's factory."""

import cl_vla.policies.tiny_vla  # noqa: F401  (registers "tiny_vla" with PreTrainedConfig)
