"""The resume fingerprint covers every setting of the composed config except the documented allowed list.

The settings are generated from the composed schema (the structured ``Config`` plus every
``conf/algorithm`` choice's own keys), not from a hand-kept list: changing any fingerprinted one must be
refused naming the key and both values; changing any allowed one must pass.
"""

from __future__ import annotations

from typing import Any

import pytest
from omegaconf import OmegaConf

from cl_vla.cli import validate_config
from cl_vla.config.fingerprint import (
    MAY_CHANGE_ON_RESUME,
    ResumeMismatch,
    check_resume_config,
    config_fingerprint,
    flatten,
    may_change_on_resume,
)
from conftest import CONF_DIR, compose_config

ALGORITHMS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


def _compose(*overrides: str):
    return validate_config(compose_config(*overrides, "output_dir=/tmp/x"))


def _changed(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.125
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, list):
        return [*value, "extra"]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    return "changed"  # None


def _with(cfg, key: str, value: Any):
    plain = OmegaConf.to_container(cfg, resolve=True)
    node = plain
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return OmegaConf.create(plain)


def _settings(cfg) -> list[str]:
    return sorted(flatten(OmegaConf.to_container(cfg, resolve=True)))


@pytest.fixture(scope="module", params=ALGORITHMS)
def composed(request):
    return _compose(f"algorithm={request.param}")


def test_every_fingerprinted_setting_refuses_a_change(composed):
    saved = config_fingerprint(composed)
    keys = [k for k in _settings(composed) if not may_change_on_resume(k)]
    assert {"model.image_size", "data.heldout_fraction", "algorithm._target_", "seed"} <= set(keys)
    for key in keys:
        old = _leaf(composed, key)
        new = _changed(old)
        with pytest.raises(ResumeMismatch) as info:
            check_resume_config(saved, _with(composed, key, new), "run")
        msg = str(info.value)
        assert f" {key}=" in msg and "\n" not in msg, key
        assert msg.count(f"{key}=") == 2, (key, old, msg)  # both values named


def _leaf(cfg, key: str) -> Any:
    node: Any = OmegaConf.to_container(cfg, resolve=True)
    for p in key.split("."):
        node = node[p]
    return node


def test_every_allowed_setting_may_change(composed):
    saved = config_fingerprint(composed)
    allowed = [k for k in _settings(composed) if may_change_on_resume(k)]
    # Each documented entry matches at least one real setting (no stale names in the allowed list).
    for entry in MAY_CHANGE_ON_RESUME:
        assert any(k == entry or k.startswith(entry + ".") for k in allowed), entry
    changed = composed
    for key in allowed:
        check_resume_config(saved, _with(composed, key, _changed(_leaf(composed, key))), "run")
        changed = _with(changed, key, _changed(_leaf(changed, key)))
    check_resume_config(saved, changed, "run")  # all of them at once


def test_schema_fields_are_all_in_the_fingerprint_or_allowed():
    """Every field of the structured schema shows up as a setting (nothing is silently left out)."""
    import dataclasses
    import typing

    from cl_vla.config.schema import Config

    keys = set(_settings(_compose()))

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                yield from walk(kind, prefix + f.name + ".")
            else:
                yield prefix + f.name

    open_groups = {"algorithm", "model"}  # open mappings: their keys come from each choice's YAML
    for name in set(walk(Config)) - open_groups:
        assert name in keys or any(k.startswith(name + ".") for k in keys), name


def test_another_task_order_shows_where_the_orders_differ():
    """Two orders of LIBERO-Spatial's long instructions share a long prefix: the message shows both
    values from just before their first difference, not the same cut-off start twice."""
    cfg = _compose("task_sequence=libero_spatial")
    tasks = list(cfg.task_sequence.tasks)
    swapped = [*tasks[:5], tasks[6], tasks[5], *tasks[7:]]
    with pytest.raises(ResumeMismatch) as info:
        check_resume_config(config_fingerprint(cfg), _with(cfg, "task_sequence.tasks", swapped), "run")
    msg = str(info.value)
    was = msg.split("was made with task_sequence.tasks=")[1].split(" but this run has")[0]
    now = msg.split("but this run has task_sequence.tasks=")[1].split(" (they differ")[0]
    assert was != now and was.startswith("...") and now.startswith("...")
    assert tasks[5][:20] in was and tasks[6][:20] in now  # each side shows its own task at that place
    assert "(they differ from character" in msg and "\n" not in msg


def test_a_synthetic_run_made_before_the_schema_rename_still_resumes():
    from cl_vla.config.fingerprint import check_resume_config

    cfg = _compose("algorithm=er")
    now = config_fingerprint(cfg)
    assert now["data.synthetic.schema"] == "ipec" and "eval.keep_best_within_task" in now
    # A run of an older cl_vla: no keep_best key, and the same synthetic keys under their old name.
    old = {k: v for k, v in now.items() if k != "eval.keep_best_within_task"}
    check_resume_config({**old, "data.synthetic.schema": "lerobot"}, cfg, "run")
    # Today "lerobot" is lerobot/libero's schema (image2): a run made with it is another dataset.
    with pytest.raises(ResumeMismatch, match=r"data\.synthetic\.schema=lerobot"):
        check_resume_config({**now, "data.synthetic.schema": "lerobot"}, cfg, "run")
