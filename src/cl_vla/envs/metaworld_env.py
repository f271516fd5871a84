"""One Meta-World task in this process, as lerobot's ``MetaworldEnv`` builds it, rendered fast on a CPU.

Environments are built as lerobot builds them (``MT1(task, seed=42)``, its first train task, then
seeded object randomization, so ``reset(seed)`` decides the scene; the ``corner2`` camera moved and its
image flipped like lerobot's), with lerobot's observation keys (``pixels``, ``agent_pos``,
``environment_state``). The task list, the observation spec and the worker processes are in
:mod:`cl_vla.envs.metaworld`.

Rendering is the cost that matters on a CPU: one ``mujoco.Renderer`` per task is shared by all of that
task's environments in a process, at the dataset's small resolution, without shadows, reflections or
multisampling (about 8 ms a frame with llvmpipe, against 110-170 ms for the default settings).
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from cl_vla.errors import CLVLAError

if TYPE_CHECKING:
    from cl_vla.envs.metaworld import ObservationSpec

CAMERAS = ("topview", "corner", "corner2", "corner3", "behindGripper", "gripperPOV")
STATE_DIM = 4  # lerobot's agent_pos: hand xyz + gripper opening
ENV_STATE_DIM = 39  # Meta-World's observation: hand, gripper, two objects, previous frame, goal
ACTION_DIM = 4
MAX_PATH_LENGTH = 500  # Meta-World refuses to step an episode past this
MT1_SEED = 42  # lerobot's MetaworldEnv builds every task from MT1(task, seed=42)


class RenderingError(CLVLAError):
    """MuJoCo cannot render offscreen on this machine."""


def rendering_help(cause: BaseException | str) -> str:
    """One sentence: why rendering failed and which packages / ``MUJOCO_GL`` value fix it."""
    backend = os.environ.get("MUJOCO_GL") or "unset"
    why = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"Meta-World cannot render offscreen (MUJOCO_GL={backend}: {why[:160].rstrip('.')}); install "
        "libegl1 and libgl1-mesa-dri and set MUJOCO_GL=egl, or install libosmesa6 and set MUJOCO_GL=osmesa."
    )


class TaskRenderer:
    """One offscreen renderer for every environment of one task in this process (same model, same assets)."""

    def __init__(self, model: Any, spec: ObservationSpec) -> None:
        import mujoco

        try:
            model.vis.quality.offsamples = 0  # multisampling: ~2.5x the cost for little at 64 px
            self.renderer = mujoco.Renderer(model, spec.height, spec.width)
        except Exception as e:  # EGL/OSMesa/GLFW report failures in many shapes
            raise RenderingError(rendering_help(e)) from e
        self.flags = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION)
        self.spec = spec

    def render(self, data: Any) -> dict[str, np.ndarray]:
        out = {}
        for cam in self.spec.cameras:
            self.renderer.update_scene(data, camera=cam)
            for flag in self.flags:
                self.renderer.scene.flags[flag] = 0
            img = self.renderer.render()
            # lerobot's MetaworldEnv flips corner2 images on both axes; do the same so data match its env.
            out[cam] = np.ascontiguousarray(img[::-1, ::-1]) if cam == "corner2" else img.copy()
        return out

    def close(self) -> None:
        self.renderer.close()


class MetaworldTaskEnv:
    """One Meta-World task with seeded resets and lerobot-format observations.

    ``reset(seed)`` places the objects from ``seed`` exactly as lerobot's ``MetaworldEnv.reset(seed)``;
    ``step(action)`` returns ``(obs, success)``. ``raw_obs`` is Meta-World's own observation (what the
    scripted expert reads).
    """

    def __init__(self, task: str, spec: ObservationSpec, renderer: TaskRenderer | None = None) -> None:
        self.task, self.spec = task, spec
        mt1 = _mt1(task)
        env = mt1.train_classes[task]()
        env.set_task(mt1.train_tasks[0])
        env.model.cam_pos[CAMERAS.index("corner2")] = [0.75, 0.075, 0.7]  # as lerobot's MetaworldEnv
        env.reset()
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        self.env = env
        self.renderer = renderer or TaskRenderer(env.model, spec)
        self.raw_obs: np.ndarray | None = None

    def _obs(self, raw: np.ndarray) -> dict[str, Any]:
        obs: dict[str, Any] = {
            "pixels": self.renderer.render(self.env.data),
            "agent_pos": raw[:STATE_DIM].astype(np.float32),
        }
        if self.spec.environment_state:
            obs["environment_state"] = raw.astype(np.float32)
        return obs

    def reset(self, seed: int) -> dict[str, Any]:
        self.env.seed(int(seed))
        raw, _ = self.env.reset(seed=int(seed))
        self.raw_obs = raw
        return self._obs(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool]:
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(ACTION_DIM), -1.0, 1.0)
        raw, _reward, _done, _trunc, info = self.env.step(action)
        self.raw_obs = raw
        return self._obs(raw), bool(info.get("success", 0))

    def close(self) -> None:
        self.env.close()


@cache
def _mt1(task: str) -> Any:
    import metaworld

    return metaworld.MT1(task, seed=MT1_SEED)


class EnvCache:
    """The environments and renderers of one process, kept across episodes and evaluations."""

    def __init__(self, spec: ObservationSpec) -> None:
        self.spec = spec
        self.envs: dict[str, list[MetaworldTaskEnv]] = {}
        self.renderers: dict[str, TaskRenderer] = {}

    def get(self, task: str, n: int) -> list[MetaworldTaskEnv]:
        envs = self.envs.setdefault(task, [])
        while len(envs) < n:
            env = MetaworldTaskEnv(task, self.spec, self.renderers.get(task))
            self.renderers.setdefault(task, env.renderer)
            envs.append(env)
        return envs[:n]

    def close(self) -> None:
        # Renderers first and explicitly: freeing GL contexts at interpreter exit prints EGL errors.
        for r in self.renderers.values():
            r.close()
        for envs in self.envs.values():
            for env in envs:
                env.close()
        self.envs.clear()
        self.renderers.clear()


__all__ = [
    "ACTION_DIM",
    "CAMERAS",
    "ENV_STATE_DIM",
    "MAX_PATH_LENGTH",
    "MT1_SEED",
    "STATE_DIM",
    "EnvCache",
    "MetaworldTaskEnv",
    "RenderingError",
    "TaskRenderer",
    "rendering_help",
]
