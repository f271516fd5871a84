"""Objects named in the config by ``_target_`` (Lightning callbacks and loggers added by users)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from cl_vla.errors import ConfigError


def instantiate_named(entries: Mapping[str, Any] | None, kind: type, key: str) -> list[Any]:
    """Instantiate ``{name: {_target_: ..., ...}}`` entries; anything that is not a ``kind`` is refused."""
    out = []
    for name, entry in (entries or {}).items():
        if entry is None:  # `~trainer.callbacks.x` or `x: null` switches an entry off
            continue
        if not isinstance(entry, Mapping | DictConfig) or "_target_" not in entry:
            raise ConfigError(
                f"{key}.{name} must be a mapping with a _target_ (a class path); got {entry!r}."
            )
        obj = instantiate(entry)
        if not isinstance(obj, kind):
            raise ConfigError(
                f"{key}.{name} built a {type(obj).__name__}, not a lightning {kind.__name__}; "
                f"{entry['_target_']!r} is not allowed there."
            )
        out.append(obj)
    return out
