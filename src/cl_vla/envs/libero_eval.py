"""Closed-loop evaluation in LIBERO (``eval=sim`` with a LIBERO sequence).

Each task of the sequence is a task of a LIBERO suite (``task_sequence.suite`` = ``libero_spatial``...;
``task_sequence.env_tasks`` name them, matched against the suite's task names; default: the suite's
tasks 0..n-1). Episode k of every evaluation starts from LIBERO's official init state
``eval.init_states[k]`` (default: init state k, as LIBERO's own evaluation; its protocol is 50 episodes
per task), lets the scene settle for ``eval.libero_settle_steps`` no-op steps (lerobot's 10), and
succeeds when LIBERO's ``check_success()`` holds within the suite's step limit (lerobot's: spatial 280,
object 280, goal 300, libero_10 520, libero_90 400; ``eval.max_episode_steps`` overrides it).

Environments are lerobot's ``LiberoEnv`` (``pixels_agent_pos``), rendered at the policy's image size,
built once per (task, slot) in each worker and kept for the whole run; later episodes use LIBERO's soft
reset (``hard_reset=False``: init state set on the existing model, no rebuild), which makes every
evaluation after the first of a task cost only its steps. An environment cannot serve another task: each
task's BDDL file builds its own MuJoCo model. The observation is mapped to the training
data's features by the dataset schema (:mod:`cl_vla.envs.libero_schema`). Episodes run
``eval.parallel_envs`` at a time, spread over ``eval.num_workers`` processes; under DDP they are split
over the ranks (:class:`cl_vla.evaluation.closed_loop.ClosedLoopEvaluator`). ``eval.libero_fast_render`` drops
shadows, reflections and multisampling (2-3x faster steps with software rendering; the images then
differ slightly from the datasets', so leave it off for numbers you report).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cl_vla.envs.libero_schema import AGENTVIEW, WRIST, schema_for_policy, to_policy_batch
from cl_vla.envs.libero_setup import LiberoSetupError, check_loaded_assets, prepare_libero
from cl_vla.envs.workers import SimWorkers
from cl_vla.errors import ConfigError, one_of
from cl_vla.evaluation.closed_loop import ClosedLoopEvaluator, check_sim_settings

log = logging.getLogger("cl_vla")

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# lerobot's per-suite episode limits (lerobot/envs/libero.py, TASK_SUITE_MAX_STEPS): above the longest
# demonstration of each suite.
SUITE_MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
SUITE_MAX_STEPS["libero_90"] = 400
NUM_INIT_STATES = 50  # LIBERO ships 50 init states per task (its evaluation protocol: 50 episodes)


def check_libero_available(suite: str | None, assets: str | None = None) -> None:
    """Raise one sentence naming what LIBERO evaluation lacks here (package, assets); prepares LIBERO."""
    if suite not in LIBERO_SUITES:
        raise ConfigError(
            f"eval.env=libero needs a LIBERO task sequence, but task_sequence.suite is {suite!r}; "
            f"choose one of {', '.join(LIBERO_SUITES)}."
        )
    try:
        check_loaded_assets(prepare_libero(assets))
    except LiberoSetupError:
        raise
    except Exception as e:  # LIBERO's import: a broken install reports itself in many shapes
        raise LiberoSetupError(
            f"LIBERO could not be imported ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "reinstall it with pip install 'cl_vla[libero]'."
        ) from e


def init_state_ids(eval_cfg: Any) -> list[int]:
    """Which official init state each episode starts from (``eval.init_states``, default 0..episodes-1)."""
    episodes = int(eval_cfg.episodes)
    given = _get(eval_cfg, "init_states")
    ids = list(range(episodes)) if given is None else [int(i) for i in given]
    if len(ids) != episodes:
        raise ConfigError(
            f"eval.init_states lists {len(ids)} init states but eval.episodes={episodes}; give one init "
            "state per episode."
        )
    bad = [i for i in ids if not 0 <= i < NUM_INIT_STATES]
    if bad:
        raise ConfigError(
            f"eval.init_states holds {bad[0]}, but LIBERO has init states 0 to {NUM_INIT_STATES - 1} "
            "per task."
        )
    return ids


def resolve_task_ids(suite: str, env_tasks: Sequence[Any] | None, num_tasks: int) -> list[int]:
    """Suite task ids of the sequence's tasks: ``env_tasks`` by LIBERO task name (or id), else 0..n-1."""
    from libero.libero import benchmark

    names = [t.name for t in benchmark.get_benchmark_dict()[suite]().tasks]
    if not env_tasks:
        if num_tasks > len(names):
            raise ConfigError(f"{suite} has {len(names)} tasks, but the sequence has {num_tasks}.")
        return list(range(num_tasks))
    ids = []
    for t in env_tasks:
        if isinstance(t, int) or str(t).isdigit():
            ids.append(int(t))
        elif str(t) in names:
            ids.append(names.index(str(t)))
        else:
            raise ConfigError(
                f"task_sequence.env_tasks names {t!r}, which is not a task of {suite}; its tasks are e.g. "
                f"{one_of(names[:2])}."
            )
    return ids


@dataclass(frozen=True)
class LiberoSettings:
    """What a worker needs to build LIBERO environments (picklable)."""

    suite: str
    task_ids: tuple[int, ...]
    height: int
    width: int
    settle_steps: int = 10
    soft_reset: bool = True
    assets: str | None = None
    fast_render: bool = False
    max_envs: int = 8  # environments kept per process (least recently used tasks' closed first)


class LiberoHandler:
    """The LIBERO environments of one process: one per (task, slot), kept across episodes and rows."""

    def __init__(self, settings: LiberoSettings) -> None:
        prepare_libero(settings.assets)  # a spawned worker: config, GL backend, asset folder first
        from lerobot.envs.libero import _get_suite

        self.settings = settings
        self.suite = _get_suite(settings.suite)
        self.envs: dict[tuple[int, int], Any] = {}
        self.recent: list[int] = []  # tasks by last use, most recent last
        self.active: list[Any] = []
        self.last: list[dict[str, Any]] = []

    def _env(self, task: int, slot: int) -> Any:
        key = (task, slot)
        if key not in self.envs:
            from lerobot.envs.libero import LiberoEnv

            self._make_room(task)
            s = self.settings
            self.envs[key] = LiberoEnv(
                self.suite,
                s.task_ids[task],
                s.suite,
                obs_type="pixels_agent_pos",
                observation_width=s.width,
                observation_height=s.height,
                num_steps_wait=s.settle_steps,
                hard_reset=not s.soft_reset,
            )
        self.recent = [t for t in self.recent if t != task] + [task]
        return self.envs[key]

    def _make_room(self, task: int) -> None:
        """Close the least recently used tasks' environments until one more fits in ``max_envs``.

        A LIBERO environment holds ~0.85 GB (scene meshes and textures, also in the software renderer);
        keeping every task's lets each row after the first reuse them.
        """
        for old in list(self.recent):
            if len(self.envs) < self.settings.max_envs or old == task:
                continue
            for key in [k for k in self.envs if k[0] == old]:
                self.envs.pop(key).close()
            self.recent.remove(old)

    @staticmethod
    def _flat(obs: dict[str, Any]) -> dict[str, Any]:
        rs = obs["robot_state"]
        flat = {
            "pixels": {AGENTVIEW: obs["pixels"]["image"], WRIST: obs["pixels"]["image2"]},
            "eef_pos": np.asarray(rs["eef"]["pos"], dtype=np.float64),
            "eef_quat": np.asarray(rs["eef"]["quat"], dtype=np.float64),
            "gripper_qpos": np.asarray(rs["gripper"]["qpos"], dtype=np.float64),
        }
        joints = rs.get("joints", {}).get("pos")
        if joints is not None:  # robosuite's robot0_joint_pos: lerobot_image's observation.state.joint
            flat["joint_pos"] = np.asarray(joints, dtype=np.float64)
        return flat

    def reset(self, task: int, init_states: Sequence[int]) -> dict[str, Any]:
        """Reset one environment per init state of ``task``; returns their batched observations."""
        self.active = [self._env(task, slot) for slot in range(len(init_states))]
        self.last = []
        for env, init in zip(self.active, init_states, strict=True):
            env.init_state_id = int(init)  # LiberoEnv resets to init state `init_state_id` (then advances it)
            obs = _reset(env)
            if self.settings.fast_render and _draft_rendering(env):
                env.init_state_id = int(init)  # again, so the whole episode is rendered the same way
                obs = _reset(env)
            self.last.append(self._flat(obs))
        return _stack(self.last)

    def step(self, actions: np.ndarray, running: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        success = np.zeros(len(self.active), dtype=bool)
        for i, env in enumerate(self.active):
            if running[i]:
                obs, _r, _term, _trunc, info = env.step(np.clip(actions[i], -1.0, 1.0).astype(np.float64))
                self.last[i] = self._flat(obs)
                success[i] = bool(info.get("is_success", False))
        return _stack(self.last), success

    def raw_frames(self, camera: str) -> np.ndarray:
        """What ``camera`` shows now in each active environment, rendered afresh and untouched (tests)."""
        frames = [env._env.env._get_observations(force_update=True)[f"{camera}_image"] for env in self.active]
        return np.stack(frames)

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


def _draft_rendering(env: Any) -> bool:
    """Render without shadows, reflections or multisampling (2-3x faster with software GL); True if changed.

    robosuite's offscreen context (``sim._render_context_offscreen``) holds the scene flags and the GL
    buffers; multisampling is fixed when the buffers are made, so they are made again.
    """
    import mujoco

    sim = env._env.env.sim
    ctx = sim._render_context_offscreen
    changed = False
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
        if ctx.scn.flags[flag]:
            ctx.scn.flags[flag] = 0
            changed = True
    if sim.model._model.vis.quality.offsamples:
        sim.model._model.vis.quality.offsamples = 0
        ctx.gl_ctx.make_current()
        ctx.con.free()
        ctx._set_mujoco_context_and_buffers()
        changed = True
    return changed


def _stack(obs: list[dict[str, Any]]) -> dict[str, Any]:
    def cat(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {k: cat([v[k] for v in values]) for k in values[0]}
        return np.stack(values)

    return cat(obs)


class LiberoEvaluator(ClosedLoopEvaluator):
    """Success rates in LIBERO for the tasks of a LIBERO sequence."""

    simulator = "LIBERO"

    def __init__(
        self,
        suite: str | None,
        env_tasks: Sequence[Any] | None,
        instructions: Sequence[str],
        policy_cfg: Any,
        eval_cfg: Any,
        *,
        run_dir: str | Path | None = None,
        wandb_run: Callable[[], Any] | None = None,
        render_size: tuple[int, int] | None = None,
    ) -> None:
        """``render_size``: the (height, width) the training data's cameras were recorded at, where the
        policy reads them resized (``task_sequence.image_size``); None: the policy's own input size."""
        assets = _get(eval_cfg, "libero_assets")
        check_libero_available(suite, assets)
        self.suite = str(suite)
        check_sim_settings(eval_cfg, max_steps=10_000, simulator="LIBERO")
        steps = eval_cfg.max_episode_steps or SUITE_MAX_STEPS[self.suite]
        super().__init__(instructions, eval_cfg, max_steps=int(steps), run_dir=run_dir, wandb_run=wandb_run)
        inputs = dict(policy_cfg.input_features or {})
        action = (policy_cfg.output_features or {}).get("action")
        self.schema = schema_for_policy(
            str(_get(eval_cfg, "libero_schema") or "auto"), inputs, action.shape if action else None
        )
        self.image_keys = tuple(k for k in self.schema.camera_keys if k in inputs)
        sizes = {tuple(inputs[k].shape[1:]) for k in self.image_keys} or {(64, 64)}
        if len(sizes) > 1:
            raise ConfigError(
                f"The policy's cameras have different sizes {sorted(sizes)}; LIBERO renders one."
            )
        # The policy's size; LIBERO renders at the recorded size (256 for the hub sets, as openpi renders
        # its LIBERO evaluation) and a resized one is resized here exactly as training resized it.
        self.policy_size = sizes.pop()
        height, width = tuple(render_size) if render_size else self.policy_size
        self.seed = int(eval_cfg.seed)
        self.init_states = init_state_ids(eval_cfg)
        self.task_ids = resolve_task_ids(self.suite, env_tasks, len(self.instructions))
        self.settings = LiberoSettings(
            self.suite,
            tuple(self.task_ids),
            int(height),
            int(width),
            settle_steps=int(_get(eval_cfg, "libero_settle_steps", 10)),
            soft_reset=bool(_get(eval_cfg, "libero_soft_reset", True)),
            assets=assets,
            fast_render=bool(_get(eval_cfg, "libero_fast_render", False)),
            max_envs=int(_get(eval_cfg, "libero_max_envs", 8)),
        )
        # Like LIBERO's own evaluation (one environment per process, episodes in turn) unless told.
        self.max_parallel = _get(eval_cfg, "parallel_envs") or max(1, self.num_workers)

    def _make_workers(self) -> SimWorkers:
        return SimWorkers(partial(LiberoHandler, self.settings), self.num_workers, 600.0, name="LIBERO")

    def _reset_args(self, task: int, episodes: list[int]) -> tuple:
        return task, [self.init_states[e] for e in episodes]

    def _policy_batch(self, obs: dict[str, Any], module: Any) -> dict[str, Any]:
        batch = to_policy_batch(obs, self.schema, self.image_keys)
        if (self.settings.height, self.settings.width) != tuple(self.policy_size):
            from cl_vla.data.alignment import resize_image

            for key in self.image_keys:
                batch[key] = resize_image(batch[key], tuple(self.policy_size))
        return {k: v.to(module.device) for k, v in batch.items()}

    def _frames(self, obs: dict[str, Any]) -> np.ndarray | None:
        img = obs["pixels"][AGENTVIEW]
        return img[:, ::-1, ::-1] if self.schema.rotate_180 else img  # upright, as the policy sees it

    def _task_name(self, task: int) -> str:
        return f"{self.suite}_{self.task_ids[task]}"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """A key of an OmegaConf node or a plain namespace (tests build the latter)."""
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None and default is not None else value


def _reset(env: Any) -> Any:
    """``env.reset()`` without its side effect on numpy's global generator: LIBERO's reset calls
    ``np.random.seed(None)`` (OS entropy), which in-process evaluation (eval.num_workers=0) would leak
    into the training process, whose numpy state is checkpointed for exact resume."""
    state = np.random.get_state()
    try:
        obs, _ = env.reset()
    finally:
        np.random.set_state(state)
    return obs
