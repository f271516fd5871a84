"""Closed-loop evaluation in LIBERO through lerobot's own LIBERO env and rollout (``eval.env=libero``).

The interface is :class:`cl_vla.envs.rollout.MetaworldEvaluator`'s: ``evaluate(module, tasks, label)``
returns one success rate per task position, ``close()`` ends it. Each task of the sequence is a LIBERO
suite task (``task_sequence.suite`` = ``libero_spatial`` ...; ``env_tasks`` give the task ids, default
0..n-1 in order); episodes run in lerobot's vectorized ``LiberoEnv`` with lerobot's env processors and
``lerobot_eval.rollout``. LIBERO needs ``lerobot[libero]`` and its assets, which LIBERO downloads from a
hub at first use: on a machine without either, :func:`check_libero_available` stops the run with one
sentence naming what is missing, before any training.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_vla.envs.rollout import RolloutStats
from cl_vla.errors import ConfigError

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


def check_libero_available(suite: str | None) -> None:
    """Raise one sentence naming what LIBERO evaluation lacks here (package, assets or hub access)."""
    if suite not in LIBERO_SUITES:
        raise ConfigError(
            f"eval.env=libero needs a LIBERO task sequence, but task_sequence.suite is {suite!r}; "
            f"choose one of {', '.join(LIBERO_SUITES)}."
        )
    if importlib.util.find_spec("libero") is None:
        raise ConfigError(
            "eval.env=libero needs the LIBERO simulator, which is not installed; install it with "
            "pip install 'cl_vla[libero]' (lerobot[libero]) on a machine that can download LIBERO's assets."
        )
    try:
        from libero.libero import get_libero_path

        assets = Path(get_libero_path("assets"))
    except Exception as e:  # LIBERO's first import writes its config and may try to download
        raise ConfigError(
            f"eval.env=libero could not locate LIBERO's assets ({type(e).__name__}: {str(e)[:120]}); "
            "run LIBERO once on a machine with hub access so it downloads them."
        ) from e
    if not assets.is_dir() or not any(assets.iterdir()):
        offline = " and the hub is off (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ConfigError(
            f"eval.env=libero needs LIBERO's assets at {str(assets)!r}, which are missing{offline}; "
            "download them on a machine with hub access (LIBERO fetches them at first use)."
        )


class LiberoEvaluator:
    """Success rates in LIBERO for the tasks of a LIBERO sequence (lerobot's env and rollout)."""

    def __init__(
        self,
        suite: str | None,
        env_tasks: Sequence[Any] | None,
        num_tasks: int,
        policy_cfg: Any,
        eval_cfg: Any,
        *,
        run_dir: str | Path | None = None,
        wandb_run: Callable[[], Any] | None = None,
    ) -> None:
        check_libero_available(suite)
        self.suite = str(suite)
        self.task_ids = [int(t) for t in env_tasks] if env_tasks else list(range(num_tasks))
        self.policy_cfg, self.eval_cfg = policy_cfg, eval_cfg
        self.episodes = int(eval_cfg.episodes)
        self.seeds = [int(eval_cfg.seed) + k for k in range(self.episodes)]
        self.stats = RolloutStats()
        self._envs: dict[int, Any] = {}
        from lerobot.envs.configs import LiberoEnv
        from lerobot.envs.factory import make_env_pre_post_processors

        self.env_cfg = LiberoEnv(task=self.suite, episode_length=int(eval_cfg.max_episode_steps))
        self.env_pre, self.env_post = make_env_pre_post_processors(self.env_cfg, policy_cfg)

    def _env(self, task: int) -> Any:
        if task not in self._envs:
            from lerobot.envs.factory import make_env

            self.env_cfg.task_ids = [self.task_ids[task]]
            envs = make_env(
                self.env_cfg, n_envs=self.episodes, use_async_envs=int(self.eval_cfg.num_workers) > 1
            )
            self._envs[task] = next(iter(next(iter(envs.values())).values()))
        return self._envs[task]

    @torch.no_grad()
    def evaluate(self, module: Any, tasks: Sequence[int], label: str = "eval") -> list[float]:
        from lerobot.scripts.lerobot_eval import rollout

        rates = []
        for task in tasks:
            with module.algorithm.eval_context(task, module):
                out = rollout(
                    self._env(task),
                    module.policy,
                    self.env_pre,
                    self.env_post,
                    module.preprocessor,
                    module.postprocessor,
                    seeds=self.seeds,
                )
            rates.append(float(np.mean(out["success"].any(dim=1).numpy())))
            self.stats.env_steps += int((~out["done"]).sum()) + self.episodes
        return rates

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
