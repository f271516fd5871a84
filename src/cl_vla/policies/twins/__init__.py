"""Tiny twins of the hub VLAs: lerobot's own SmolVLA, pi0, pi0.5 and GR00T classes and processors at a
tiny size with random weights, built offline in seconds (``conf/model/*_tiny.yaml``).

A twin is a ``model`` config with a ``twin:`` block (sizes; ``{}`` takes the defaults). The block is
cl_vla's, not lerobot's: :func:`prepare_twin` turns it into lerobot config fields, and
:func:`building` is the context every build of the policy or its processors runs in (pi0 / pi0.5 /
GR00T need a few of lerobot's hard-coded sizes replaced meanwhile; SmolVLA needs nothing). The spec
rides on the lerobot config object as ``cl_vla_twin`` (not a dataclass field, so lerobot never saves
it) and in ``cl_vla_twin.json`` next to a saved twin.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cl_vla.errors import ConfigError, one_of

TWIN_FILE = "cl_vla_twin.json"
TWIN_TYPES = ("smolvla", "pi0", "pi05", "groot")
_ATTR = "cl_vla_twin"


def prepare_twin(model_type: str, spec: Mapping[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill lerobot config ``kwargs`` for the twin of ``model_type``; returns the full spec."""
    spec = dict(spec or {})
    if model_type == "smolvla":
        from cl_vla.policies.twins import smolvla

        smolvla.prepare(spec, kwargs)
    elif model_type in ("pi0", "pi05"):
        from cl_vla.policies.twins import paligemma

        spec = paligemma.check_spec(spec, model_type)
        paligemma.prepare(spec, kwargs)
    elif model_type == "groot":
        from cl_vla.policies.twins import groot

        spec = groot.check_spec(spec)
        groot.prepare(spec, kwargs)
    else:
        raise ConfigError(
            f"model.twin is set for model.type={model_type!r}; twins exist for {one_of(TWIN_TYPES)}."
        )
    return {"type": model_type, "spec": spec}


def attach(policy_cfg: Any, twin: Mapping[str, Any] | None) -> None:
    """Remember the twin on the lerobot config (an attribute, not a field: lerobot never saves it)."""
    object.__setattr__(policy_cfg, _ATTR, dict(twin) if twin else None)


def twin_of(policy_cfg: Any) -> dict[str, Any] | None:
    return getattr(policy_cfg, _ATTR, None)


@contextlib.contextmanager
def building(twin: Mapping[str, Any] | None) -> Iterator[None]:
    """The context a twin's policy and processors are built (or loaded) in; nothing for real models."""
    if not twin or twin["type"] == "smolvla":
        yield
        return
    if twin["type"] in ("pi0", "pi05"):
        from cl_vla.policies.twins.paligemma import tiny_sizes

        with tiny_sizes(twin["type"], twin["spec"]):
            yield
        return
    from cl_vla.policies.twins.groot import tiny_sizes as groot_sizes

    with groot_sizes(twin["spec"]):
        yield


def write_twin_file(folder: Path, twin: Mapping[str, Any] | None) -> None:
    if twin:
        (folder / TWIN_FILE).write_text(json.dumps(dict(twin), indent=2, sort_keys=True))


def read_twin_file(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / TWIN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
