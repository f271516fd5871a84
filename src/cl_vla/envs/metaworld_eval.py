"""Closed-loop success in Meta-World (``eval=sim``) on
:class:`cl_vla.evaluation.closed_loop.ClosedLoopEvaluator`.

For each evaluated task, ``eval.episodes`` episodes run at once in vectorized environments spread over
``eval.num_workers`` processes. Episode k of every evaluation is reset with seed ``eval.seed + k``:
every row of R sees the same scenes, none of them a demonstration's (the recording's seeds are
checked). An episode succeeds when Meta-World reports success within ``eval.max_episode_steps`` steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cl_vla.envs.metaworld import (
    MAX_PATH_LENGTH,
    ObservationSpec,
    SimWorkers,
    check_task_names,
    spec_from_policy_features,
)
from cl_vla.errors import ConfigError
from cl_vla.evaluation.closed_loop import ClosedLoopEvaluator, check_sim_settings

log = logging.getLogger("cl_vla")
DEFAULT_EPISODE_STEPS = 150  # Meta-World's limit when eval.max_episode_steps is null


class MetaworldEvaluator(ClosedLoopEvaluator):
    """Success rates of a policy on the Meta-World tasks of a sequence."""

    simulator = "Meta-World"

    def __init__(
        self,
        env_tasks: Sequence[str],
        instructions: Sequence[str],
        policy_cfg: Any,
        eval_cfg: Any,
        *,
        demo_seeds: dict[str, list[int]] | None = None,
        run_dir: str | Path | None = None,
        wandb_run: Callable[[], Any] | None = None,
    ) -> None:
        check_sim_settings(eval_cfg, MAX_PATH_LENGTH, "Meta-World")
        super().__init__(
            instructions,
            eval_cfg,
            max_steps=int(eval_cfg.max_episode_steps or DEFAULT_EPISODE_STEPS),
            run_dir=run_dir,
            wandb_run=wandb_run,
        )
        self.env_tasks = check_task_names(env_tasks)
        action = (policy_cfg.output_features or {}).get("action")
        self.spec: ObservationSpec = spec_from_policy_features(
            dict(policy_cfg.input_features or {}), action.shape if action is not None else None
        )
        self.single_image_key = "observation.image" in (policy_cfg.input_features or {})
        self.seed = int(eval_cfg.seed)
        self.seeds = [self.seed + k for k in range(self.episodes)]
        self._check_disjoint(demo_seeds or {})

    def _check_disjoint(self, demo_seeds: dict[str, list[int]]) -> None:
        for task in self.env_tasks:
            used = set(demo_seeds.get(task, ()))
            clash = sorted(used.intersection(self.seeds))
            if clash:
                raise ConfigError(
                    f"eval.seed={self.seeds[0]} makes evaluation episodes reuse demonstration seeds of "
                    f"{task!r} (e.g. {clash[0]}); choose eval.seed above {max(used)}."
                )

    def _make_workers(self) -> SimWorkers:
        return SimWorkers(self.spec, self.num_workers)

    def _reset_args(self, task: int, episodes: list[int]) -> tuple:
        return self.env_tasks[task], [self.seeds[e] for e in episodes]

    def _policy_batch(self, obs: dict[str, Any], module: Any) -> dict[str, Any]:
        from lerobot.envs.utils import preprocess_observation

        batch = {k: v.to(module.device) for k, v in preprocess_observation(obs).items()}
        if self.single_image_key:  # lerobot's one-camera key; its camera is corner2
            batch["observation.image"] = batch.pop("observation.images.corner2")
        return batch

    def _frames(self, obs: dict[str, Any]) -> np.ndarray | None:
        return obs["pixels"][self.spec.cameras[0]] if self.spec.cameras else None

    def _task_name(self, task: int) -> str:
        return self.env_tasks[task]
