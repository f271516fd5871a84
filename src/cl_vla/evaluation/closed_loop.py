"""Closed-loop evaluation: the success rate of every task, one row of R, in any simulator.

:class:`ClosedLoopEvaluator` holds what every simulator shares (Meta-World's evaluator is
:mod:`cl_vla.envs.metaworld_eval`, LIBERO's :mod:`cl_vla.envs.libero_eval`): each evaluated task runs
its ``eval.episodes`` episodes over ``eval.num_workers`` worker processes (they step and render; this
process batches the policy over all of them); under DDP the episodes are split over the ranks and the
success counts summed. An evaluation that runs past ``eval.timeout_s`` counts its unfinished episodes
as failures and says so. Actions come from the policy's own ``select_action`` (action chunking and
all), between the run's pre/post-processors, inside the algorithm's ``eval_context`` for the task.

Optional videos (``eval.videos`` episodes per task) go to ``<run dir>/videos/`` and to W&B.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_vla.algorithms.base import rank_and_world
from cl_vla.errors import ConfigError

log = logging.getLogger("cl_vla")


def check_sim_settings(eval_cfg: Any, max_steps: int, simulator: str) -> None:
    """Range checks of the ``eval`` group for ``eval=sim``; one sentence each."""
    if int(eval_cfg.episodes) < 1:
        raise ConfigError(f"eval.episodes={eval_cfg.episodes} is not allowed; it must be at least 1.")
    steps = eval_cfg.max_episode_steps
    if steps is not None and not 1 <= int(steps) <= max_steps:
        raise ConfigError(
            f"eval.max_episode_steps={steps} is not allowed; {simulator} episodes take 1 to {max_steps} "
            "steps (null: the simulator's own limit)."
        )
    if int(eval_cfg.videos) < 0 or int(eval_cfg.num_workers) < 0:
        raise ConfigError("eval.videos and eval.num_workers must not be negative.")


@dataclass
class RolloutStats:
    """Totals over every evaluation of a run (for the run's figures)."""

    env_steps: int = 0
    episodes: int = 0
    seconds: float = 0.0
    timeouts: int = 0
    per_eval: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "seconds": round(self.seconds, 2),
            "env_steps_per_s": round(self.env_steps / self.seconds, 1) if self.seconds else None,
            "seconds_per_episode": round(self.seconds / self.episodes, 2) if self.episodes else None,
            "timeouts": self.timeouts,
            "per_eval": self.per_eval,
        }


class ClosedLoopEvaluator:
    """Success rates of a policy on the tasks of a sequence in a simulator; keeps its workers between calls.

    The simulator-specific parts are a handful of hooks: which workers to start (:meth:`_make_workers`),
    what a worker's ``reset`` gets for a shard of episodes (:meth:`_reset_args`), the policy batch made
    from an observation (:meth:`_policy_batch`), the first camera's frames for videos (:meth:`_frames`)
    and a short name for files (:meth:`_task_name`). Workers answer ``reset(*args) -> obs`` and
    ``step(actions, running) -> (obs, success)``, ``obs`` a dict (of dicts) of arrays with one row per
    environment. Everything else (episodes split over DDP ranks and over workers, the step loop, time
    limits, statistics, videos) is shared.
    """

    simulator = "simulation"

    def __init__(
        self,
        instructions: Sequence[str],
        eval_cfg: Any,
        *,
        max_steps: int,
        run_dir: str | Path | None = None,
        wandb_run: Callable[[], Any] | None = None,
    ) -> None:
        self.instructions = [str(i) for i in instructions]
        self.episodes = int(eval_cfg.episodes)
        self.max_steps = int(max_steps)
        self.timeout_s = float(eval_cfg.timeout_s) if eval_cfg.timeout_s else None
        self.videos = int(eval_cfg.videos)
        self.num_workers = min(int(eval_cfg.num_workers), self.episodes)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wandb_run = wandb_run
        self.stats = RolloutStats()
        self.max_parallel: int | None = None  # episodes run at once (environments kept); None: all
        self._labels: dict[str, int] = {}
        self._workers: Any = None

    # ---- simulator hooks ------------------------------------------------------------------------------

    def _make_workers(self) -> Any:
        raise NotImplementedError

    def _reset_args(self, task: int, episodes: list[int]) -> tuple:
        raise NotImplementedError

    def _policy_batch(self, obs: dict[str, Any], module: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _frames(self, obs: dict[str, Any]) -> np.ndarray | None:
        return None

    def _task_name(self, task: int) -> str:
        return f"task{task}"

    # ---------------------------------------------------------------------------------------------------

    @property
    def workers(self) -> Any:
        if self._workers is None:
            self._workers = self._make_workers()
        return self._workers

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None

    @torch.no_grad()
    def evaluate(self, module: Any, tasks: Sequence[int], label: str = "eval") -> list[float]:
        """Success rate in [0, 1] of every task position in ``tasks``.

        Under DDP the episodes are split over the ranks (rank r runs episodes r, r + world, ...) and the
        success counts summed, so the rate is over all ``eval.episodes`` and no episode runs twice.
        """
        rank, world = rank_and_world()
        # One name per evaluation (videos and statistics): a repeated label gets a counter.
        self._labels[label] = self._labels.get(label, 0) + 1
        if self._labels[label] > 1:
            label = f"{label}_{self._labels[label]}"
        mine = list(range(rank, self.episodes, world))
        policy = module.policy
        was_training = policy.training
        policy.eval()
        tic = time.perf_counter()
        deadline = tic + self.timeout_s if self.timeout_s else None
        steps_before = self.stats.env_steps
        counts = torch.zeros(len(tasks), 2, dtype=torch.float64)  # successes, episodes
        try:
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                torch.manual_seed(int(getattr(self, "seed", 0)))
                for k, task in enumerate(tasks):
                    with module.algorithm.eval_context(task, module):
                        counts[k] = torch.tensor(self._task(module, task, label, deadline, mine, rank))
        finally:
            policy.train(was_training)
        # Totals over every rank (rank 0 writes them): successes, episodes, env steps.
        step_count = torch.tensor([float(self.stats.env_steps - steps_before)], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            counts, step_count = counts.to(module.device), step_count.to(module.device)
            dist.all_reduce(counts)
            dist.all_reduce(step_count)
            counts, step_count = counts.cpu(), step_count.cpu()
        rates = [float(s / n) for s, n in counts.tolist()]
        seconds = time.perf_counter() - tic
        self.stats.seconds += seconds
        steps = int(step_count.item())
        self.stats.env_steps = steps_before + steps
        self.stats.episodes += int(counts[:, 1].sum())
        self.stats.per_eval.append(
            {"label": label, "seconds": round(seconds, 2), "env_steps": steps, "success": rates}
        )
        log.info(
            "%s: %d env steps in %.1f s (%.0f steps/s)", label, steps, seconds, steps / max(seconds, 1e-9)
        )
        return rates

    def _task(
        self, module: Any, task: int, label: str, deadline: float | None, episodes: list[int], rank: int
    ) -> tuple[int, int]:
        """Run ``episodes`` (episode ids of this evaluation) of one task; ``(successes, episodes run)``."""
        width = int(self.max_parallel or len(episodes) or 1)
        successes = 0
        for start in range(0, len(episodes), width):
            chunk = episodes[start : start + width]
            videos = rank == 0 and start == 0  # rank 0's first episodes are filmed
            successes += self._run_episodes(module, task, label, deadline, chunk, videos)
        return successes, len(episodes)

    def _run_episodes(
        self, module: Any, task: int, label: str, deadline: float | None, episodes: list[int], videos: bool
    ) -> int:
        """Run ``episodes`` of one task at once (one environment each); the number of successes."""
        n = len(episodes)
        instruction = self.instructions[task]
        w = self.workers
        shards = [list(range(i, n, w.size)) for i in range(w.size)]
        shards = [s for s in shards if s]
        for i, idx in enumerate(shards):
            w.submit(i, "reset", *self._reset_args(task, [episodes[k] for k in idx]))
        obs = _gather([w.result(i) for i in range(len(shards))], shards)
        module.policy.reset()
        running = np.ones(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        frames: list[list[np.ndarray]] = [[] for _ in range(min(self.videos, n) if videos else 0)]
        for _step in range(self.max_steps):
            images = self._frames(obs) if frames else None
            if images is not None:
                for k, buf in enumerate(frames):
                    if running[k]:
                        buf.append(images[k])
            batch = self._policy_batch(obs, module)
            batch["task"] = [instruction] * n
            action = module.policy.select_action(module.preprocessor(batch))
            if module.postprocessor is not None:
                action = module.postprocessor(action)
            action = action.detach().cpu().numpy().astype(np.float32)
            for i, idx in enumerate(shards):
                w.submit(i, "step", action[idx], running[idx])
            self.stats.env_steps += int(running.sum())
            results = [w.result(i) for i in range(len(shards))]
            obs = _gather([r[0] for r in results], shards)
            for i, idx in enumerate(shards):
                done = results[i][1] & running[idx]
                success[idx] |= done
                running[idx] &= ~done
            if not running.any():
                break
            if deadline is not None and time.perf_counter() > deadline:
                self.stats.timeouts += int(running.sum())
                log.warning(
                    "%s: eval.timeout_s=%.0f reached; %d unfinished episode(s) of %r count as failures.",
                    label,
                    self.timeout_s,
                    int(running.sum()),
                    self._task_name(task),
                )
                break
        if frames:
            self._save_videos(frames, success, label, task, episodes)
        return int(success.sum())

    def _save_videos(
        self, frames: list[list[np.ndarray]], success: np.ndarray, label: str, task: int, episodes: list[int]
    ) -> None:
        if self.run_dir is None or not any(frames):
            return
        from lerobot.utils.io_utils import write_video

        out = self.run_dir / "videos" / label
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, buf in enumerate(frames):
            if not buf:
                continue
            scale = max(1, 256 // buf[0].shape[0])  # small observations: enlarge (nearest) to watch them
            clip = [np.repeat(np.repeat(f, scale, axis=0), scale, axis=1) for f in buf]
            outcome = "success" if success[k] else "failure"
            path = out / f"task{task:02d}_{self._task_name(task)}_ep{episodes[k]}_{outcome}.mp4"
            write_video(path, clip, fps=30)
            paths.append(path)
        run = self.wandb_run() if self.wandb_run is not None else None
        if run is not None and paths:
            import wandb

            run.log({f"videos/task_{task:02d}": [wandb.Video(str(p), format="mp4") for p in paths]})


def _gather(parts: list[dict[str, Any]], shards: list[list[int]]) -> dict[str, Any]:
    """Worker shards back into episode order (episode k is at row k), through nested dicts."""
    order = np.argsort(np.concatenate(shards))

    def cat(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {key: cat([v[key] for v in values]) for key in values[0]}
        return np.concatenate(values)[order]

    return cat(parts)
