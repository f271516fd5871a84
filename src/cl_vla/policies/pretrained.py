"""``model.pretrained_path=<folder>``: the config comes from the folder (as lerobot's own training
does), with the ``model`` group's fields on top; no hub call."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cl_vla.errors import ConfigError


def config_from_folder(
    model_type: str, folder: Path, overrides: dict[str, Any], device: str
) -> tuple[Any, dict[str, Any] | None]:
    """``(lerobot config, twin spec or None)`` of a folder written by ``save_pretrained``.

    ``overrides`` (the ``model`` group's lerobot fields) replace the saved values, like lerobot's
    ``--policy.<field>=`` options; the twin spec is the one saved with a twin (``cl_vla_twin.json``).
    """
    from lerobot.configs.policies import PreTrainedConfig

    from cl_vla.policies.twins import read_twin_file

    try:
        cfg = PreTrainedConfig.from_pretrained(str(folder))
    except Exception as e:  # draccus/json errors: a config lerobot cannot read
        raise ConfigError(
            f"model.pretrained_path={str(folder)!r} has a config.json lerobot cannot read: {e}".splitlines()[
                0
            ]
        ) from e
    if cfg.type != model_type:
        raise ConfigError(
            f"model.pretrained_path={str(folder)!r} holds a {cfg.type!r} policy, "
            f"not model.type={model_type!r}; use model={cfg.type} (or its _tiny twin) with this folder."
        )
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(k for k in overrides if k not in fields)
    if unknown:
        raise ConfigError(f"model={model_type} has no field(s) {unknown}; see {type(cfg).__name__}.")
    for k, v in overrides.items():
        setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) and isinstance(v, list) else v)
    cfg.device = device
    return cfg, read_twin_file(folder)
