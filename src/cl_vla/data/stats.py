"""Normalization statistics as an explicit choice: whole dataset, first task, or tasks seen so far.

Each episode of a LeRobot v3 dataset carries its own statistics in ``meta/episodes``; the statistics of
any set of episodes are their aggregate (lerobot's ``aggregate_stats``), so no frame is read again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lerobot.datasets.compute_stats import aggregate_stats

from cl_vla.errors import ConfigError, DataError, one_of

Stats = dict[str, dict[str, np.ndarray]]


class NormalizationChoice(StrEnum):
    DATASET = "dataset"  # every episode of the dataset (leaks future tasks' ranges: the usual practice)
    FIRST_TASK = "first_task"  # frozen after task 0: a strict CL protocol, never sees the future
    SEEN_TASKS = "seen_tasks"  # re-aggregated at each task start over the tasks trained so far

    @classmethod
    def parse(cls, value: str) -> NormalizationChoice:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"data.normalization={value!r} is not allowed; choose {one_of([c.value for c in cls])}."
            ) from None


@cache
def _episode_stats_table(root: str) -> pd.DataFrame:
    files = sorted(Path(root, "meta", "episodes").glob("*/*.parquet"))
    if not files:
        raise DataError(f"No episode metadata under {root}/meta/episodes.")
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return df.set_index("episode_index", drop=False)


def episode_stats(meta: Any, episode: int) -> Stats:
    """The statistics lerobot stored for one episode, as ``{feature: {stat: array}}``."""
    own = getattr(meta, "global_episode_stats", None)
    if callable(own):  # several datasets behind one episode numbering (cl_vla.data.multi_source)
        return own(episode)
    df = _episode_stats_table(str(meta.root))
    row = df.loc[int(episode)]
    out: Stats = {}
    for col, value in row.items():
        if not isinstance(col, str) or not col.startswith("stats/"):
            continue
        _, feature_and_stat = col.split("/", 1)
        feature, stat = feature_and_stat.rsplit("/", 1)
        out.setdefault(feature, {})[stat] = np.asarray(_stack(value), dtype=np.float64)
    return out


def _stack(value: Any) -> Any:
    # Image stats come back as nested object arrays (C x 1 x 1); make them dense.
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.stack([_stack(v) for v in value])
    return value


def aggregate_episode_stats(meta: Any, episodes: Iterable[int]) -> Stats:
    """Aggregate statistics of a set of episodes (means/stds pooled exactly, min/max over all)."""
    eps = list(episodes)
    if not eps:
        raise DataError("Cannot compute normalization statistics over zero episodes.")
    return aggregate_stats([episode_stats(meta, e) for e in eps])


def select_stats(
    choice: NormalizationChoice | str,
    meta: Any,
    train_episodes_per_task: Sequence[Sequence[int]],
    current_task: int,
) -> Stats:
    """The statistics to normalize with while training task ``current_task`` (0-based position)."""
    choice = NormalizationChoice.parse(str(choice))
    if choice is NormalizationChoice.DATASET:
        return {k: {s: np.asarray(v) for s, v in d.items()} for k, d in meta.stats.items()}
    tasks = [0] if choice is NormalizationChoice.FIRST_TASK else range(current_task + 1)
    return aggregate_episode_stats(meta, sorted({e for t in tasks for e in train_episodes_per_task[t]}))


def stats_to_jsonable(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def flatten_stats(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``{"feature/stat": tensor}``: the form saved in checkpoints (safetensors-compatible keys)."""
    return {
        f"{k}/{s}": torch.as_tensor(np.asarray(v), dtype=torch.float32).contiguous()
        for k, d in stats.items()
        for s, v in d.items()
    }


def unflatten_stats(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        feature, stat = key.rsplit("/", 1)
        out.setdefault(feature, {})[stat] = value
    return out
