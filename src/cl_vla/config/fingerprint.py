"""What a resumed run must share with the run it continues: every resolved setting but a short list.

The fingerprint is the whole resolved config, flattened to dotted keys, minus
:data:`MAY_CHANGE_ON_RESUME`. Deriving it from the config (not from a hand-kept list of "important"
keys) means a setting added to the schema or to an algorithm/model YAML is guarded from the day it
exists; only a deliberate entry in the allowed list lets it change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cl_vla.errors import CLVLAError

# Settings that may differ on resume, with why: each decides how a run is shown, logged, checkpointed or
# executed, never which batches are drawn, what is computed from them, or what is evaluated.
MAY_CHANGE_ON_RESUME: dict[str, str] = {
    "resume": "names the run to continue",
    "output_dir": "a resume writes into the original run directory; this is only Hydra's new folder",
    "dry_run": "stops before training",
    "logger": "where metrics are sent (W&B, CSV, TensorBoard), not what they are",
    "experiment.name": "a label (and Hydra's folder name)",
    "experiment.group": "a label for W&B grouping",
    "experiment.notes": "free text",
    "trainer.progress_bar": "terminal display",
    "trainer.log_every_n_steps": "logging frequency",
    "trainer.checkpoint_every_n_steps": "when checkpoints are written, not what is trained",
    "continual_learning.save_checkpoint_per_task": "which checkpoints are kept",
    "continual_learning.export_per_task": "whether each task's policy is also written in lerobot's format",
    "data.num_workers": "loader processes; batches are drawn by index in the main process",
    "data.memory_workers": "which processes decode the same memory frames",
    "data.root": "where the same dataset is read from (a moved copy)",
    "data.video_backend": "which decoder reads the same frames",
    "eval.num_workers": "simulator processes; episode seeds do not depend on them",
    "eval.videos": "episodes saved as video",
    "eval.libero_assets": "where the same LIBERO assets are read from (a moved copy)",
    "eval.libero_max_envs": "how many LIBERO environments a process keeps built, not what they simulate",
}


class ResumeMismatch(CLVLAError):
    """A resume whose configuration differs from the run it continues in a fingerprinted setting."""


def may_change_on_resume(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in MAY_CHANGE_ON_RESUME)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for every leaf of a (resolved) mapping; lists are leaves."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: node}


def config_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The fingerprinted settings of ``cfg`` as JSON values, keyed by their dotted names."""
    # Top-level run-control keys are never fingerprinted, and output_dir does not resolve outside a
    # Hydra run: leave them out before resolving the rest.
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for key in ("output_dir", "resume", "dry_run"):
        if key in cfg:
            del cfg[key]  # not pop(): it would resolve the value it returns
    container = OmegaConf.to_container(cfg, resolve=True)
    flat = flatten(container)  # type: ignore[arg-type]
    # JSON round trip: what the checkpoint stores is what we compare against (tuples become lists...).
    return {k: json.loads(json.dumps(v)) for k, v in sorted(flat.items()) if not may_change_on_resume(k)}


def _is_legacy(saved: dict[str, Any]) -> bool:
    """Checkpoints of cl_vla before config fingerprints kept a few undotted keys."""
    return bool(saved) and not any("." in k for k in saved)


def _legacy_view(cfg: DictConfig, task_names: list[str] | None) -> dict[str, Any]:
    view = {
        "model": cfg.model.type,
        "lora": bool(cfg.model.get("lora")),
        "algorithm": cfg.algorithm.get("name", cfg.algorithm.get("_target_")),
        "steps_per_task": int(cfg.continual_learning.steps_per_task),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.data.batch_size),
        "devices": str(cfg.trainer.devices),
        "num_nodes": int(cfg.trainer.num_nodes),
    }
    if task_names is not None:
        view["task_sequence"] = task_names
    return view


def check_resume_config(saved: dict[str, Any], cfg: DictConfig, where: str | Path) -> None:
    """Raise one sentence naming the first fingerprinted setting whose value differs from the run's.

    Keys the saved fingerprint lacks are settings that did not exist when the run was made (an older
    cl_vla); they cannot be compared and are skipped.
    """
    if _is_legacy(saved):
        names = saved.get("task_sequence")
        current = _legacy_view(cfg, list(cfg.task_sequence.tasks) if names is not None else None)
        prefix = {
            "model": "model.type",
            "algorithm": "algorithm.name",
            "steps_per_task": "continual_learning.steps_per_task",
            "batch_size": "data.batch_size",
            "devices": "trainer.devices",
            "num_nodes": "trainer.num_nodes",
            "lora": "model.lora",
            "task_sequence": "task_sequence.tasks",
        }
        pairs = {prefix.get(k, k): (saved[k], current.get(k)) for k in saved}
    else:
        now = config_fingerprint(cfg)
        saved = _renamed_since(saved)
        pairs = {k: (v, now.get(k, "<unset>")) for k, v in saved.items()}
    for key in sorted(pairs):
        was, now_value = pairs[key]
        if was != now_value:
            shown_was, shown_now, at = _show_pair(was, now_value)
            raise ResumeMismatch(
                f"resume={str(where)!r} was made with {key}={shown_was} but this run has "
                f"{key}={shown_now}{at}; a resumed run must keep every setting that changes what is "
                "trained or evaluated (README 'Resume' lists those that may change)."
            )


_SHOWN = 80  # characters of a value a message shows


def _show_pair(was: Any, now: Any) -> tuple[str, str, str]:
    """Both values as text; long ones cut to the same window around their first difference (two task
    orders share a long prefix: cutting both at the start would show two equal strings)."""
    a, b = (json.dumps(v) if not isinstance(v, str) else v for v in (was, now))
    if len(a) <= _SHOWN and len(b) <= _SHOWN:
        return a, b, ""
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, i - _SHOWN // 3)
    return _window(a, start), _window(b, start), f" (they differ from character {i})"


def _window(text: str, start: int) -> str:
    end = start + _SHOWN - 6
    return ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")


def _renamed_since(saved: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint in today's names. Before ``eval.keep_best_within_task`` existed, the synthetic
    datasets' keys (image + wrist_image) were called schema ``lerobot``; they are ``ipec``'s now, and
    ``lerobot`` names lerobot/libero's (image + image2)."""
    if "eval.keep_best_within_task" not in saved and saved.get("data.synthetic.schema") == "lerobot":
        return {**saved, "data.synthetic.schema": "ipec"}
    return saved
