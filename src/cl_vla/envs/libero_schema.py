"""From a LIBERO observation to the features of the dataset a policy was trained on, per dataset schema.

LIBERO datasets in LeRobot format do not all name and orient things alike, and a mismatch between
training data and evaluation silently gives 0 % success. The schema (``eval.libero_schema``) says which
dataset family the policy was trained on; :func:`to_policy_batch` then turns the simulator's
observation into exactly that family's features:

* ``lerobot`` -- ``lerobot/libero`` (1,693 episodes of the four suites' 40 tasks, 256 px; lerobot's docs:
  "the same schema" as ``HuggingFaceVLA/libero``): ``observation.images.image`` (agent view) and
  ``observation.images.image2``, the names lerobot's own ``LiberoEnv`` gives its cameras
  (``lerobot/envs/configs.py``, ``LiberoEnv.features_map``);
* ``huggingfacevla`` -- ``HuggingFaceVLA/libero`` (PNG images): the same keys;
* ``lerobot_image`` -- ``lerobot/libero_*_image`` (codebase v3.0, images, labelled 20 fps):
  ``observation.images.image`` and ``observation.images.wrist_image``, plus the arm's seven joint
  positions as ``observation.state.joint``;
* ``ipec`` -- ``IPEC-COMMUNITY/libero_*_no_noops_1.0.0_lerobot`` (codebase v2.1 on the hub: convert
  them with lerobot's ``convert_dataset_v21_to_v30`` first): ``observation.images.image`` and
  ``observation.images.wrist_image``, labelled 20 fps;
* ``libero_hdf5`` -- LIBERO's own demonstrations converted as they are (``agentview_rgb`` and
  ``eye_in_hand_rgb``), in the orientation LIBERO renders.

The hub families come from OpenVLA's re-rendered no-noop demonstrations, whose images are
rotated by 180 degrees from what LIBERO renders (lerobot's ``LiberoProcessorStep`` rotates for the same
reason); ``libero_hdf5`` is not rotated. All of them carry the same 8-d state -- end-effector position
(3), end-effector orientation as an axis-angle vector (3, from LIBERO's xyzw quaternion) and the two
gripper finger joints (2) -- and the same 7-d action, LIBERO's own: delta position (3), delta
axis-angle rotation (3) and gripper (-1 open, +1 closed), each in [-1, 1]. Images reach the policy as
lerobot's ``preprocess_observation`` makes them: float32 in [0, 1], channels first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cl_vla.errors import ConfigError, one_of

STATE_DIM, ACTION_DIM, JOINT_DIM = 8, 7, 7
STATE_NAMES = ("eef_x", "eef_y", "eef_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z")
STATE_NAMES = (*STATE_NAMES, "gripper_qpos_left", "gripper_qpos_right")
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
# LIBERO's cameras as its environments name them (robosuite appends "_image" to observation keys).
AGENTVIEW, WRIST = "agentview", "robot0_eye_in_hand"


@dataclass(frozen=True)
class LiberoSchema:
    """How one dataset family stores a LIBERO frame."""

    name: str
    datasets: str  # the hub datasets that use it (for messages and the README)
    cameras: tuple[tuple[str, str], ...]  # (dataset feature key, LIBERO camera)
    rotate_180: bool  # images rotated by 180 degrees from LIBERO's render
    image_dtype: str  # "video" or "image": how the dataset stores images (the synthetic writer follows)
    fps: int  # as the sets label it; every family holds one frame per 20 Hz control step
    joint_key: str | None = None  # the arm's joint positions (robosuite's robot0_joint_pos), if stored

    @property
    def state_keys(self) -> tuple[str, ...]:
        return ("observation.state",) + ((self.joint_key,) if self.joint_key else ())

    @property
    def camera_keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.cameras)

    def features(self, image_size: int, use_videos: bool | None = None) -> dict[str, dict]:
        """LeRobot dataset features of this schema (what a dataset of this family declares)."""
        video = self.image_dtype == "video" if use_videos is None else use_videos
        img = {
            "dtype": "video" if video else "image",
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channels"],
        }
        feats: dict[str, dict] = {key: dict(img) for key in self.camera_keys}
        feats["observation.state"] = {"dtype": "float32", "shape": (STATE_DIM,), "names": list(STATE_NAMES)}
        if self.joint_key:
            names = [f"joint_{i + 1}" for i in range(JOINT_DIM)]
            feats[self.joint_key] = {"dtype": "float32", "shape": (JOINT_DIM,), "names": names}
        feats["action"] = {"dtype": "float32", "shape": (ACTION_DIM,), "names": list(ACTION_NAMES)}
        return feats


SCHEMAS: dict[str, LiberoSchema] = {
    s.name: s
    for s in (
        LiberoSchema(
            "lerobot",
            "lerobot/libero",
            (("observation.images.image", AGENTVIEW), ("observation.images.image2", WRIST)),
            rotate_180=True,
            image_dtype="image",
            fps=10,
        ),
        LiberoSchema(
            "huggingfacevla",
            "HuggingFaceVLA/libero",
            (("observation.images.image", AGENTVIEW), ("observation.images.image2", WRIST)),
            rotate_180=True,
            image_dtype="image",
            fps=10,
        ),
        LiberoSchema(
            "lerobot_image",
            "lerobot/libero_*_image",
            (("observation.images.image", AGENTVIEW), ("observation.images.wrist_image", WRIST)),
            rotate_180=True,
            image_dtype="image",
            fps=20,
            joint_key="observation.state.joint",
        ),
        LiberoSchema(
            "ipec",
            "IPEC-COMMUNITY/libero_*_no_noops_1.0.0_lerobot",
            (("observation.images.image", AGENTVIEW), ("observation.images.wrist_image", WRIST)),
            rotate_180=True,
            image_dtype="video",
            fps=20,
        ),
        LiberoSchema(
            "libero_hdf5",
            "LIBERO's own hdf5 demonstrations",
            (("observation.images.agentview_rgb", AGENTVIEW), ("observation.images.eye_in_hand_rgb", WRIST)),
            rotate_180=False,
            image_dtype="image",
            fps=20,
        ),
    )
}


def schemas_with_cameras(keys) -> list[str]:
    """Names of the schemas whose cameras are exactly ``keys`` (for messages about a mismatch)."""
    return [s.name for s in SCHEMAS.values() if set(s.camera_keys) == set(keys)]


def get_schema(name: str) -> LiberoSchema:
    if name not in SCHEMAS:
        raise ConfigError(f"eval.libero_schema={name!r} is unknown; choose 'auto' or {one_of(SCHEMAS)}.")
    return SCHEMAS[name]


def schema_for_policy(name: str, input_features: Mapping[str, Any], action_shape: Any) -> LiberoSchema:
    """The schema ``name`` (``auto``: the one whose camera keys the policy reads), checked against the policy.

    The policy's image inputs must be the schema's cameras, its state 8-d and its action 7-d; anything
    else is one sentence naming the feature.
    """
    images = [k for k in input_features if k.startswith("observation.image")]
    states = {k for k in input_features if k.startswith("observation.state")}
    if name == "auto":
        matches = [
            s
            for s in SCHEMAS.values()
            if images and set(images) <= set(s.camera_keys) and states <= set(s.state_keys)
        ]
        if not matches:
            raise ConfigError(
                f"No LIBERO dataset schema has the policy's cameras {images}; set eval.libero_schema to "
                f"{one_of(SCHEMAS)} and train on data with that schema's camera keys."
            )
        # Schemas sharing keys map them alike (they differ in storage); the one with exactly the policy's
        # state features first, so a policy without joint positions is not described as having them.
        schema = sorted(matches, key=lambda s: set(s.state_keys) != states)[0]
    else:
        schema = get_schema(name)
    for key, ft in input_features.items():
        shape = tuple(ft.shape)
        if key.startswith("observation.image"):
            if key not in schema.camera_keys or len(shape) != 3 or shape[0] != 3:
                fits = [s.name for s in SCHEMAS.values() if images and set(images) <= set(s.camera_keys)]
                hint = f"; the policy's cameras are those of {one_of(fits)}" if fits else ""
                raise ConfigError(
                    f"The policy expects input {key!r} of shape {shape}, which LIBERO schema {schema.name!r} "
                    f"does not provide (its cameras are {one_of(schema.camera_keys)}, 3 channels){hint}."
                )
        elif key == "observation.state":
            if shape != (STATE_DIM,):
                raise ConfigError(
                    f"The policy expects 'observation.state' of shape {shape}, but LIBERO's is "
                    f"({STATE_DIM},) (eef position, eef axis-angle, two gripper joints)."
                )
        elif key == schema.joint_key:
            if shape != (JOINT_DIM,):
                raise ConfigError(
                    f"The policy expects {key!r} of shape {shape}, but LIBERO's arm has {JOINT_DIM} joints."
                )
        else:
            raise ConfigError(
                f"The policy expects input {key!r}, which LIBERO schema {schema.name!r} does not provide; "
                f"it provides {one_of([*schema.camera_keys, *schema.state_keys])}."
            )
    if action_shape is not None and tuple(action_shape) != (ACTION_DIM,):
        raise ConfigError(
            f"The policy outputs actions of shape {tuple(action_shape)}, but LIBERO takes ({ACTION_DIM},)."
        )
    return schema


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(B, 4) xyzw quaternions -> (B, 3) axis-angle vectors, as robosuite's ``quat2axisangle``."""
    quat = np.asarray(quat, dtype=np.float64)
    w = np.clip(quat[:, 3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    angle = 2.0 * np.arccos(w)
    scale = np.where(den > 1e-10, angle / np.where(den > 1e-10, den, 1.0), 0.0)
    return quat[:, :3] * scale[:, None]


def libero_state(obs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The 8-d state of a batch of observations (``eef_pos``, ``eef_quat``, ``gripper_qpos``)."""
    state = np.concatenate(
        [obs["eef_pos"], quat_to_axis_angle(obs["eef_quat"]), obs["gripper_qpos"]], axis=1
    ).astype(np.float32)
    return state


def to_policy_batch(
    obs: Mapping[str, Any], schema: LiberoSchema, keys: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """A batch of simulator observations as the schema's features (images float CHW in [0, 1]).

    ``obs``: ``pixels`` (LIBERO camera -> (B, H, W, 3) uint8, as rendered), ``eef_pos`` (B, 3),
    ``eef_quat`` (B, 4, xyzw), ``gripper_qpos`` (B, 2), and for a schema with joint positions
    ``joint_pos`` (B, 7). ``keys``: the image features to produce (default: all of the schema's cameras).
    """
    batch: dict[str, torch.Tensor] = {}
    for key, camera in schema.cameras:
        if keys is not None and key not in keys:
            continue
        img = np.asarray(obs["pixels"][camera])
        if schema.rotate_180:
            img = img[:, ::-1, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(0, 3, 1, 2)
        batch[key] = t.to(torch.float32) / 255.0
    batch["observation.state"] = torch.from_numpy(libero_state(obs))
    if schema.joint_key:
        if "joint_pos" not in obs:
            raise RuntimeError(
                f"LIBERO schema {schema.name!r} needs the arm's joint positions, but the simulator's "
                "observation has no robot0_joint_pos."
            )
        batch[schema.joint_key] = torch.from_numpy(np.asarray(obs["joint_pos"], dtype=np.float32))
    return batch
