"""Per-task split of episodes into training and held-out (evaluation) episodes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cl_vla.errors import ConfigError, DataError


def split_episodes(
    episode_task_map: Mapping[int, Sequence[int]],
    task_indices: Sequence[int],
    heldout_fraction: float,
    seed: int = 0,
    task_names: Sequence[str] | None = None,
) -> dict[int, tuple[list[int], list[int]]]:
    """``task_index -> (train_episodes, heldout_episodes)``, held out by whole episodes.

    Each task holds out ``ceil(heldout_fraction * n)`` of its ``n`` episodes (at least one when the
    fraction is positive), chosen by a generator seeded from ``(seed, task_index)`` so the split does
    not depend on which other tasks are in the sequence.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={heldout_fraction} is not allowed; it must be in [0, 1).")
    names = list(task_names) if task_names is not None else [str(t) for t in task_indices]
    out: dict[int, tuple[list[int], list[int]]] = {}
    for task, name in zip(task_indices, names, strict=True):
        if task in out:
            continue  # a task revisited later in the sequence (e.g. cw20) keeps its split
        eps = sorted(int(e) for e in episode_task_map.get(task, ()))
        if not eps:
            raise DataError(f"Task {name!r} (task_index {task}) has no episodes in the dataset.")
        n_held = math.ceil(heldout_fraction * len(eps)) if heldout_fraction > 0 else 0
        if n_held >= len(eps):
            raise DataError(
                f"Task {name!r} has {len(eps)} episode(s), so data.heldout_fraction={heldout_fraction} "
                "leaves no training episode; lower it or record more episodes."
            )
        rng = np.random.default_rng([int(seed), int(task)])
        held = sorted(int(e) for e in rng.choice(eps, size=n_held, replace=False)) if n_held else []
        held_set = set(held)
        out[task] = ([e for e in eps if e not in held_set], held)
    return out
