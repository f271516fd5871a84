"""The untrained policy's closed-loop row (FWT's reference b_j), computed once per setting.

Under ``eval=sim`` the baseline row is the most expensive evaluation of a run: an untrained policy
rarely succeeds, so every episode runs to the step limit. It depends only on what the row is a
function of: the initial weights (which the seed decides), the normalization statistics, the policy's,
the data's and the evaluation's settings, the task sequence, the algorithm's evaluation context (PackNet's
masks, per-task adapters) and the versions of the code that compute it. Those are hashed into a key;
a sweep over algorithms or replay ratios then simulates each seed's baseline once.

Rows live in ``<cache>/baseline_rows/<key>.json`` (``cl_vla.paths.cache_dir``; ``eval.cache_baseline
=false`` turns the cache off). A run logs (console and train.log) when its row came from the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cl_vla.algorithms.base import CLAlgorithm
from cl_vla.paths import cache_dir
from cl_vla.training.checkpointing import atomic_write_json

#: eval.* settings that cannot change a row's numbers (processes, files written, other rows).
NOT_IN_KEY = frozenset(
    {
        "num_workers",
        "videos",
        "max_batches",
        "within_task_evals",
        "keep_best_within_task",
        "evaluate_unseen",
        "libero_assets",
        "libero_max_envs",
        "cache_baseline",
    }
)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _digest_tensors(h: Any, tensors: Mapping[str, Any]) -> None:
    for name in sorted(tensors):
        value = tensors[name]
        h.update(name.encode())
        if isinstance(value, Mapping):
            _digest_tensors(h, value)
        else:
            t = torch.as_tensor(value).detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def baseline_key(
    cfg: DictConfig, policy: torch.nn.Module, stats: Mapping[str, Any], algorithm: CLAlgorithm
) -> str:
    """A sha256 over everything the untrained row depends on (see the module docstring)."""
    settings = {
        "eval": {
            k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k not in NOT_IN_KEY
        },
        "task_sequence": OmegaConf.to_container(cfg.task_sequence, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        # What was recorded and how it is read (cameras, image size, statistics choice), not where.
        "data": {
            k: v
            for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in ("root", "num_workers", "video_backend")
        },
        "versions": {p: _version(p) for p in ("cl_vla", "lerobot", "torch", "metaworld", "mujoco", "libero")},
    }
    # Algorithms that evaluate every task as it is (most) share one row; the others add their state.
    if type(algorithm).eval_context is not CLAlgorithm.eval_context:
        settings["algorithm"] = {"name": algorithm.name, "state": repr(algorithm.state_dict())}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    _digest_tensors(h, dict(policy.state_dict()))
    _digest_tensors(h, {k: dict(v) for k, v in stats.items()})
    return h.hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "baseline_rows" / f"{key}.json"


def cached_row(key: str, num_tasks: int) -> list[float] | None:
    """The stored row for ``key``, or None (absent, unreadable, or of another length)."""
    try:
        row = json.loads(_path(key).read_text())["row"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(row, list) or len(row) != num_tasks:
        return None
    return [float(v) for v in row]


def store_row(key: str, row: list[float]) -> None:
    """Keep ``row`` for ``key`` (atomically: a concurrent reader sees the whole file or none)."""
    _path(key).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(_path(key), {"row": [float(v) for v in row]})


def baseline_row(
    key: str,
    num_tasks: int,
    evaluate: Callable[[], list[float]],
    *,
    agree: Callable[[bool], bool] = lambda have: have,
    write: bool = True,
) -> tuple[list[float], bool]:
    """``(row, from_cache)``: the cached row when every process has it, else ``evaluate()``.

    ``agree`` makes the choice collective under DDP (every rank runs the simulation, which
    all-reduces, or none does); ``write`` stores an evaluated row.
    """
    row = cached_row(key, num_tasks)
    if agree(row is not None) and row is not None:
        return row, True
    row = evaluate()
    if write:
        store_row(key, row)
    return row, False
