"""Meta-World tasks as lerobot sees them, rendered fast enough for a CPU.

Task names, language descriptions and scripted experts come from lerobot's
``lerobot/envs/metaworld_config.json`` (read directly, so a simulation worker does not import lerobot's
policy stack). Environments are built as lerobot's ``MetaworldEnv`` builds them (``MT1(task, seed=42)``,
its first train task, then seeded object randomization, so ``reset(seed)`` decides the scene; the
``corner2`` camera moved and its image flipped like lerobot's), and observations use lerobot's keys:
``pixels`` (one image per camera), ``agent_pos`` (hand xyz + gripper opening, 4-d) and
``environment_state`` (Meta-World's full 39-d observation, with the goal), which
``lerobot.envs.utils.preprocess_observation`` maps to ``observation.images.<camera>``,
``observation.state`` and ``observation.environment_state``.

The environments themselves (rendering, seeded resets, observations) are in
:mod:`cl_vla.envs.metaworld_env`; this module holds the task list, the observation spec and the
simulation workers built on them.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from cl_vla.envs import workers
from cl_vla.envs.metaworld_env import (
    ACTION_DIM,
    CAMERAS,
    ENV_STATE_DIM,
    MAX_PATH_LENGTH,
    MT1_SEED,
    STATE_DIM,
    EnvCache,
    MetaworldTaskEnv,
    RenderingError,
    rendering_help,
)
from cl_vla.errors import ConfigError, one_of

# ------------------------------------------------------------------------------------------ task list


@cache
def _lerobot_config() -> dict[str, Any]:
    spec = importlib.util.find_spec("lerobot")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "Meta-World needs lerobot[metaworld]; install it with pip install 'lerobot[metaworld]'."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "envs" / "metaworld_config.json"
    return json.loads(path.read_text())


def task_names() -> list[str]:
    """The 50 Meta-World v3 task names lerobot knows, e.g. ``reach-v3``."""
    return sorted(_lerobot_config()["TASK_DESCRIPTIONS"])


def task_description(task: str) -> str:
    return _lerobot_config()["TASK_DESCRIPTIONS"][task]


def check_task_names(names: Sequence[str], where: str = "task_sequence.env_tasks") -> list[str]:
    """Strip lerobot's ``metaworld-`` prefix and reject unknown names, suggesting the closest ones."""
    known = task_names()
    out = []
    for name in names:
        clean = str(name).removeprefix("metaworld-")
        if clean not in known:
            close = difflib.get_close_matches(clean, known, n=3, cutoff=0.5)
            hint = (
                f"did you mean {one_of(close)}?"
                if close
                else f"choose one of the {len(known)} tasks, e.g. 'reach-v3'."
            )
            raise ConfigError(f"{where} names an unknown Meta-World task {name!r}; {hint}")
        out.append(clean)
    return out


def make_expert(task: str) -> Any:
    """The scripted expert lerobot pairs with ``task`` (a ``metaworld.policies`` class instance)."""
    import metaworld.policies as policies

    return getattr(policies, _lerobot_config()["TASK_POLICY_MAPPING"][task])()


# ---------------------------------------------------------------------------------------- observation


@dataclass(frozen=True)
class ObservationSpec:
    """What an environment renders and returns: cameras at one resolution, with or without env state."""

    cameras: tuple[str, ...] = ("corner2",)
    height: int = 64
    width: int = 64
    environment_state: bool = True

    def __post_init__(self) -> None:
        for cam in self.cameras:
            if cam not in CAMERAS:
                raise ConfigError(f"Meta-World camera {cam!r} is unknown; choose from {one_of(CAMERAS)}.")
        if len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f"Meta-World cameras {list(self.cameras)} repeat a camera; list each once.")
        if not (8 <= self.height <= 480 and 8 <= self.width <= 480):
            raise ConfigError(
                f"Meta-World image size {self.height}x{self.width} is not allowed; height and width must be "
                "in [8, 480]."
            )

    def features(self, use_videos: bool = False) -> dict[str, dict]:
        """LeRobot dataset features of this observation, plus Meta-World's 4-d action."""
        img = {
            "dtype": "video" if use_videos else "image",
            "shape": (self.height, self.width, 3),
            "names": ["height", "width", "channels"],
        }
        feats: dict[str, dict] = {f"observation.images.{cam}": dict(img) for cam in self.cameras}
        feats["observation.state"] = {
            "dtype": "float32",
            "shape": (STATE_DIM,),
            "names": ["hand_x", "hand_y", "hand_z", "gripper"],
        }
        if self.environment_state:
            feats["observation.environment_state"] = {
                "dtype": "float32",
                "shape": (ENV_STATE_DIM,),
                "names": [f"mw_obs_{i}" for i in range(ENV_STATE_DIM)],
            }
        feats["action"] = {"dtype": "float32", "shape": (ACTION_DIM,), "names": ["dx", "dy", "dz", "grip"]}
        return feats


def spec_from_policy_features(
    input_features: dict[str, Any], action_shape: Sequence[int] | None
) -> ObservationSpec:
    """The observation a policy with ``input_features`` needs, or one sentence on why Meta-World lacks it.

    ``input_features`` maps keys to lerobot ``PolicyFeature`` (images channel-first). ``observation.image``
    is lerobot's single-camera key and means ``corner2``.
    """
    cams, sizes, env_state = [], set(), False
    for key, ft in input_features.items():
        shape = tuple(ft.shape)
        if key == "observation.image" or key.startswith("observation.images."):
            cam = "corner2" if key == "observation.image" else key.removeprefix("observation.images.")
            if cam not in CAMERAS or len(shape) != 3 or shape[0] != 3:
                raise ConfigError(
                    f"The policy expects input {key!r} of shape {shape}, which Meta-World cannot provide; "
                    "its images are 'observation.images.<camera>' (3 channels) with camera in "
                    f"{one_of(CAMERAS)}."
                )
            cams.append(cam)
            sizes.add(shape[1:])
        elif key == "observation.state":
            if shape != (STATE_DIM,):
                raise ConfigError(
                    f"The policy expects 'observation.state' of shape {shape}, but Meta-World's is "
                    f"({STATE_DIM},) (hand xyz + gripper); train on Meta-World data (data=metaworld) to "
                    "evaluate there."
                )
        elif key == "observation.environment_state":
            if shape != (ENV_STATE_DIM,):
                raise ConfigError(
                    f"The policy expects 'observation.environment_state' of shape {shape}, but Meta-World's "
                    f"is ({ENV_STATE_DIM},); train on Meta-World data (data=metaworld) to evaluate there."
                )
            env_state = True
        else:
            raise ConfigError(
                f"The policy expects input {key!r}, which Meta-World does not provide; it provides "
                "'observation.images.<camera>', 'observation.state' and 'observation.environment_state'."
            )
    if action_shape is not None and tuple(action_shape) != (ACTION_DIM,):
        raise ConfigError(
            f"The policy outputs actions of shape {tuple(action_shape)}, but Meta-World takes "
            f"({ACTION_DIM},); train on Meta-World data (data=metaworld) to evaluate there."
        )
    if len(sizes) > 1:
        raise ConfigError(
            f"The policy's cameras have different sizes {sorted(sizes)}; Meta-World renders one size."
        )
    h, w = sizes.pop() if sizes else (64, 64)
    return ObservationSpec(cameras=tuple(cams), height=int(h), width=int(w), environment_state=env_state)


def default_mujoco_gl() -> None:
    """Headless machines: pick EGL unless the user chose a backend (GLFW needs a display)."""
    if not os.environ.get("MUJOCO_GL") and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"


# -------------------------------------------------------------------------------------------- workers


class _Handler:
    """What a simulation worker process does; also usable in-process (``num_workers=0``)."""

    def __init__(self, spec: ObservationSpec) -> None:
        try:
            import mujoco  # noqa: F401  (picks its GL backend from MUJOCO_GL at import)
        except Exception as e:
            raise RenderingError(rendering_help(e)) from e
        self.cache = EnvCache(spec)
        self.active: list[MetaworldTaskEnv] = []
        self.last: list[dict[str, Any]] = []

    def record(self, job: tuple[int, str, int, int, float]) -> tuple[int, int, dict[str, np.ndarray] | None]:
        """One scripted-expert episode: ``(job id, seed, frames)``, frames ``None`` when it failed."""
        job_id, task, seed, max_steps, noise = job
        env = self.cache.get(task, 1)[0]
        expert = make_expert(task)
        rng = np.random.default_rng([seed, 7919])
        obs = env.reset(seed)
        frames: dict[str, list[np.ndarray]] = {}
        for _ in range(max_steps):
            action = np.clip(np.asarray(expert.get_action(env.raw_obs), dtype=np.float32), -1.0, 1.0)
            for key, value in _flat(obs).items():
                frames.setdefault(key, []).append(value)
            frames.setdefault("action", []).append(action)
            executed = action
            if noise > 0:
                executed = np.clip(action + rng.normal(0.0, noise, size=action.shape), -1.0, 1.0)
            obs, success = env.step(executed)
            if success:
                return job_id, seed, {k: np.stack(v) for k, v in frames.items()}
        return job_id, seed, None

    def reset(self, task: str, seeds: Sequence[int]) -> dict[str, Any]:
        """Reset ``len(seeds)`` environments of ``task``; returns their batched observations."""
        self.active = self.cache.get(task, len(seeds))
        self.last = [env.reset(seed) for env, seed in zip(self.active, seeds, strict=True)]
        return _stack(self.last)

    def step(self, actions: np.ndarray, running: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """Step the running environments; returns batched observations and per-env success flags."""
        success = np.zeros(len(self.active), dtype=bool)
        for i, env in enumerate(self.active):
            if running[i]:
                self.last[i], success[i] = env.step(actions[i])
        return _stack(self.last), success

    def close(self) -> None:
        self.cache.close()


def _flat(obs: dict[str, Any]) -> dict[str, np.ndarray]:
    """lerobot's observation keys -> the dataset's feature keys."""
    out = {f"observation.images.{cam}": img for cam, img in obs["pixels"].items()}
    out["observation.state"] = obs["agent_pos"]
    if "environment_state" in obs:
        out["observation.environment_state"] = obs["environment_state"]
    return out


def _stack(obs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pixels": {cam: np.stack([o["pixels"][cam] for o in obs]) for cam in obs[0]["pixels"]}
    }
    for key in ("agent_pos", "environment_state"):
        if key in obs[0]:
            out[key] = np.stack([o[key] for o in obs])
    return out


class SimWorkers(workers.SimWorkers):
    """Meta-World worker processes (``num_workers``; 0: this process), each with its own environments."""

    def __init__(self, spec: ObservationSpec, num_workers: int, timeout_s: float = 300.0) -> None:
        if num_workers > 0:
            default_mujoco_gl()
        super().__init__(partial(_Handler, spec), num_workers, timeout_s, name="Meta-World")
        self.spec = spec


# Re-exported: callers import the environment's constants and errors from here, as before the split.
__all__ = [
    "ACTION_DIM",
    "CAMERAS",
    "ENV_STATE_DIM",
    "MAX_PATH_LENGTH",
    "MT1_SEED",
    "STATE_DIM",
    "ObservationSpec",
    "RenderingError",
    "SimWorkers",
    "check_task_names",
    "default_mujoco_gl",
    "make_expert",
    "rendering_help",
    "spec_from_policy_features",
    "task_description",
    "task_names",
]
