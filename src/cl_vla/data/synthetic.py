"""Small LeRobot datasets with LIBERO's schema, written offline for tests and demos.

The data are built so that forgetting is measurable: every task sees near-identical images and
states, and its instruction alone decides the action (each task rotates the "reach the target"
direction by its own angle and sets its own gripper pattern). A policy fine-tuned on task k moves its
shared layers toward task k's mapping and visibly loses earlier tasks; replay or joint training keeps
them. Episodes of different tasks are recorded interleaved and in a shuffled task order, so the
dataset's task indices never coincide with a sequence's order by accident.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cl_vla.errors import DataError

SETTINGS_FILE = "cl_vla_synthetic.json"
GENERATOR_VERSION = 2  # bump when the generated content changes, so cached datasets are rewritten
# As LIBERO: an 8-d state (here eef pos, target pos, gripper) and a 7-d action (delta pose + gripper).
STATE_DIM, ACTION_DIM = 8, 7


# The keys synthetic datasets have always had (image + wrist_image, the 8-d state), IPEC's. (Until the
# schemas were corrected they were called "lerobot", whose hub set lerobot/libero names the wrist image2.)
DEFAULT_SCHEMA = "ipec"


@dataclass(frozen=True)
class SyntheticSpec:
    instructions: tuple[str, ...]
    episodes_per_task: int = 6
    frames_per_episode: int = 20
    image_size: int = 64
    fps: int = 10
    seed: int = 0
    use_videos: bool = False
    schema: str = DEFAULT_SCHEMA  # LIBERO dataset schema: which keys (cl_vla.envs.libero_schema)

    def fingerprint(self) -> str:
        payload = {"generator": GENERATOR_VERSION, **asdict(self)}
        if self.schema == DEFAULT_SCHEMA:
            del payload["schema"]  # the keys datasets had before schemas existed: cached copies stay valid
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def camera_keys(schema: str = DEFAULT_SCHEMA) -> tuple[str, str]:
    """The (agent view, wrist) image keys of a LIBERO dataset schema."""
    from cl_vla.envs.libero_schema import get_schema

    keys = get_schema(schema).camera_keys
    return keys[0], keys[1]


def libero_features(image_size: int, use_videos: bool = False, schema: str = DEFAULT_SCHEMA) -> dict:
    from cl_vla.envs.libero_schema import JOINT_DIM, get_schema

    img = {
        "dtype": "video" if use_videos else "image",
        "shape": (image_size, image_size, 3),
        "names": ["height", "width", "channels"],
    }
    agent, wrist = camera_keys(schema)
    feats = {
        agent: dict(img),
        wrist: dict(img),
        "observation.state": _vector(STATE_DIM, "s"),
        "action": _vector(ACTION_DIM, "a"),
    }
    joint = get_schema(schema).joint_key
    if joint:  # lerobot/libero_*_image also stores the arm's joint positions
        feats[joint] = _vector(JOINT_DIM, "q")
    return feats


def _task_angle(task: int, num_tasks: int) -> float:
    # Spread tasks around the circle so neighbouring tasks demand clearly different directions.
    return 2 * math.pi * task / max(num_tasks, 1) + 0.35


def _render(size: int, target: np.ndarray, pos: np.ndarray, tint: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    scene = np.empty((size, size, 3), np.float32)
    scene[..., 0] = 0.35 + 0.05 * tint
    scene[..., 1] = 0.4 + 0.1 * yy
    scene[..., 2] = 0.45 + 0.1 * xx
    for (cx, cy), color in (((target[0], target[1]), (0.95, 0.2, 0.2)), ((pos[0], pos[1]), (0.1, 0.1, 0.9))):
        mask = (np.abs(xx - (cx + 1) / 2) < 0.07) & (np.abs(yy - (cy + 1) / 2) < 0.07)
        scene[mask] = color
    dist = np.linalg.norm(target[:2] - pos[:2])
    wrist = np.empty((size, size, 3), np.float32)
    wrist[..., 0] = np.clip(1 - dist, 0, 1) * (0.5 + 0.5 * xx)
    wrist[..., 1] = 0.3 + 0.4 * yy
    wrist[..., 2] = 0.5 + 0.2 * np.sin(3 * pos[2])
    return (scene * 255).astype(np.uint8), (wrist * 255).astype(np.uint8)


def _vector(dim: int, prefix: str) -> dict:
    return {"dtype": "float32", "shape": (dim,), "names": [f"{prefix}{i}" for i in range(dim)]}


def write_synthetic_dataset(
    root: str | Path, repo_id: str, spec: SyntheticSpec, *, progress: bool = False
) -> Path:
    """Write (or reuse) a LeRobot v3 dataset for ``spec`` at ``root``; returns ``root``.

    A dataset already at ``root`` with the same settings is reused, also when it holds more
    instructions than ``spec`` asks for (a sub-sequence of a suite reads the suite's dataset); a
    different one is replaced. Writing goes to a sibling temporary directory that is renamed at the end, so an
    interrupted write never leaves a half dataset behind.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    settings = {"fingerprint": spec.fingerprint(), **asdict(spec)}
    marker = root / SETTINGS_FILE
    if marker.is_file() and _serves(json.loads(marker.read_text()), spec):
        return root
    if root.exists() and not marker.is_file() and (not root.is_dir() or any(root.iterdir())):
        # Only ever replace what this writer made: data.root may point at a user's real dataset.
        raise DataError(
            f"data.root={str(root)!r} holds files not written by cl_vla's synthetic writer, so it is not "
            "overwritten; choose another data.root for data=synthetic, or data=local to read that dataset."
        )
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(spec.seed)
    n_tasks = len(spec.instructions)
    ds = LeRobotDataset.create(
        repo_id,
        fps=spec.fps,
        features=libero_features(spec.image_size, spec.use_videos, spec.schema),
        root=tmp,
        robot_type="synthetic_panda",
        use_videos=spec.use_videos,
    )
    order = [t for _ in range(spec.episodes_per_task) for t in rng.permutation(n_tasks)]
    iterator = order
    if progress:
        from rich.progress import track

        iterator = track(order, description=f"writing {len(order)} synthetic episodes")
    for task in iterator:
        _write_episode(ds, int(task), n_tasks, spec, rng)
    ds.finalize()
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def _serves(saved: dict, spec: SyntheticSpec) -> bool:
    """Whether the dataset described by ``saved`` (its settings file) holds everything ``spec`` asks."""
    if saved.get("fingerprint") == spec.fingerprint():
        return True
    wanted = {**asdict(spec), "instructions": None}
    have = {k: saved.get(k) for k in wanted} | {
        "instructions": None,
        # (An older settings file's "lerobot" meant today's default keys: such a copy is served only
        # through its fingerprint above, else rewritten once.)
        "schema": saved.get("schema", DEFAULT_SCHEMA),
    }
    same_generator = SyntheticSpec(**{**asdict(spec), "instructions": tuple(saved.get("instructions") or ())})
    return (
        have == wanted
        and set(spec.instructions) <= set(saved.get("instructions") or ())
        and saved.get("fingerprint") == same_generator.fingerprint()
    )


def _write_episode(ds, task: int, n_tasks: int, spec: SyntheticSpec, rng: np.random.Generator) -> None:
    angle = _task_angle(task, n_tasks)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    target = rng.uniform(-0.6, 0.6, size=3)
    pos = rng.uniform(-0.8, 0.8, size=3)
    grip_sign = 1.0 if task % 2 == 0 else -1.0
    tint = task / max(n_tasks - 1, 1)
    agent_key, wrist_key = camera_keys(spec.schema)
    from cl_vla.envs.libero_schema import get_schema

    joint_key = get_schema(spec.schema).joint_key
    for f in range(spec.frames_per_episode):
        image, wrist = _render(spec.image_size, target, pos, tint * 0.3)
        delta = target - pos
        move = np.zeros(ACTION_DIM, np.float32)
        move[:2] = np.clip(rot @ delta[:2] * 2.0, -1, 1)
        move[2] = np.clip(delta[2] * 2.0 * math.cos(angle), -1, 1)
        move[3:6] = 0.1 * np.sin(angle + np.arange(3))
        move[6] = grip_sign if f < spec.frames_per_episode // 2 else -grip_sign
        # The state carries the target as LIBERO's carries object poses in its full observation, so the
        # mapping is learnable from few episodes and held-out episodes test it, not image memorization.
        gripper = [0.04 * (1 + move[6]), -0.04 * (1 + move[6])]
        state = np.concatenate([pos, target, gripper]).astype(np.float32)
        frame = {
            agent_key: image,
            wrist_key: wrist,
            "observation.state": state,
            "action": move,
            "task": spec.instructions[task],
        }
        if joint_key:  # stand-in joint angles, a smooth function of the state
            frame[joint_key] = np.tanh(np.concatenate([pos, target, [gripper[0]]])).astype(np.float32)
        ds.add_frame(frame)
        pos = np.clip(pos + 0.08 * move[:3] + rng.normal(0, 0.01, size=3), -1, 1)
    ds.save_episode()
