"""LIBERO's datasets as users download them: codebase versions, schemas, image sizes (no hub needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cl_vla.errors import DataError


def _info(root: Path, version: str) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": version, "fps": 20}))
    return root


def test_an_unconverted_v21_folder_names_lerobots_converter_in_one_sentence(tmp_path: Path) -> None:
    from cl_vla.data.streams import V21_CONVERTER, open_dataset

    root = _info(tmp_path / "libero_10_no_noops_1.0.0_lerobot", "v2.1")
    with pytest.raises(DataError) as info:
        open_dataset("IPEC-COMMUNITY/libero_10_no_noops_1.0.0_lerobot", root)
    msg = str(info.value)
    assert "\n" not in msg and "LeRobot v2.1 dataset" in msg and "codebase v3.0 only" in msg
    assert f"python -m {V21_CONVERTER} --repo-id=IPEC-COMMUNITY/libero_10_no_noops_1.0.0_lerobot" in msg
    assert f"--root={root} --push-to-hub=false" in msg


def test_the_converter_the_message_names_is_lerobots_module_with_those_flags() -> None:
    from cl_vla.data.streams import V21_CONVERTER

    spec = importlib.util.find_spec(V21_CONVERTER)
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    assert all(f'"{flag}"' in source for flag in ("--repo-id", "--root", "--push-to-hub"))


def test_an_unconverted_v21_set_from_the_hub_cache_is_one_sentence(monkeypatch) -> None:
    import packaging.version
    from lerobot.datasets import lerobot_dataset
    from lerobot.datasets.utils import BackwardCompatibilityError

    from cl_vla.data.streams import V21_CONVERTER, open_dataset

    def old(repo_id, **_kwargs):  # what lerobot 0.6.1 raises for a v2.1 dataset it fetched
        raise BackwardCompatibilityError(repo_id, packaging.version.parse("v2.1"))

    monkeypatch.setattr(lerobot_dataset, "LeRobotDataset", old)
    with pytest.raises(DataError) as info:
        open_dataset("IPEC-COMMUNITY/libero_spatial_no_noops_1.0.0_lerobot", None)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(
        "Dataset 'IPEC-COMMUNITY/libero_spatial_no_noops_1.0.0_lerobot'"
    )
    assert V21_CONVERTER in msg and "--push-to-hub=false" in msg


def test_an_unconverted_set_of_a_cross_dataset_sequence_keeps_its_own_message(monkeypatch) -> None:
    from cl_vla.data.cross_sequence import SourceSpec
    from cl_vla.data.multi_source import open_source
    from cl_vla.data.streams import UnconvertedDatasetError

    def cached_v21(repo_id, *_args):
        raise UnconvertedDatasetError(f"Dataset {repo_id!r} is a LeRobot v2.1 dataset, ...")

    monkeypatch.setattr("cl_vla.data.multi_source.open_dataset", cached_v21)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^Dataset 'spatial' of the task sequence: .* v2\.1 dataset"):
        open_source(SourceSpec("spatial", "IPEC-COMMUNITY/libero_spatial_no_noops_1.0.0_lerobot"), None)


# ---- schemas ------------------------------------------------------------------------------------------

# meta/info.json features of lerobot/libero_10_image (codebase v3.0, 20 fps), as the hub serves them.
LIBERO_10_IMAGE_FEATURES = {
    "observation.images.image": {
        "dtype": "image",
        "shape": [256, 256, 3],
        "names": ["height", "width", "channel"],
    },
    "observation.images.wrist_image": {
        "dtype": "image",
        "shape": [256, 256, 3],
        "names": ["height", "width", "channel"],
    },
    "observation.state": {"dtype": "float32", "shape": [8], "names": {"motors": ["x", "y", "z"]}},
    "observation.state.joint": {"dtype": "float32", "shape": [7], "names": {"motors": ["joint_1"]}},
    "action": {"dtype": "float32", "shape": [7], "names": {"motors": ["x"]}},
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
}


def _policy_inputs(features: dict) -> dict:
    from lerobot.configs.types import FeatureType
    from lerobot.utils.feature_utils import dataset_to_policy_features

    return {k: f for k, f in dataset_to_policy_features(features).items() if f.type is not FeatureType.ACTION}


def test_the_lerobot_schema_names_the_cameras_as_lerobots_libero_env_does() -> None:
    from dataclasses import fields

    from lerobot.envs.configs import LiberoEnv

    from cl_vla.envs.libero_schema import SCHEMAS

    env_map = next(f for f in fields(LiberoEnv) if f.name == "features_map").default_factory()
    env_cameras = {v for v in env_map.values() if v.startswith("observation.images.")}
    assert (
        set(SCHEMAS["lerobot"].camera_keys)
        == env_cameras
        == {
            "observation.images.image",
            "observation.images.image2",
        }
    )
    assert SCHEMAS["lerobot"].camera_keys == SCHEMAS["huggingfacevla"].camera_keys  # "the same schema"
    image_set = SCHEMAS["lerobot_image"]
    assert image_set.fps == 20 and image_set.joint_key == "observation.state.joint"
    hub = {k: tuple(f["shape"]) for k, f in LIBERO_10_IMAGE_FEATURES.items() if k != "timestamp"}
    ours = {k: tuple(f["shape"]) for k, f in image_set.features(256).items()}
    assert ours == hub


def test_the_auto_schema_follows_the_policys_features_and_a_mismatch_is_one_sentence() -> None:
    from lerobot.configs.types import FeatureType, PolicyFeature

    from cl_vla.envs.libero_schema import schema_for_policy
    from cl_vla.errors import ConfigError

    inputs = _policy_inputs(LIBERO_10_IMAGE_FEATURES)
    assert "observation.state.joint" in inputs  # lerobot makes every observation.* vector a state input
    assert schema_for_policy("auto", inputs, (7,)).name == "lerobot_image"
    no_joint = {k: v for k, v in inputs.items() if k != "observation.state.joint"}
    assert schema_for_policy("auto", no_joint, (7,)).name == "ipec"  # same cameras, no joint positions
    # A policy trained on lerobot/libero_*_image, evaluated as if trained on lerobot/libero.
    with pytest.raises(ConfigError) as info:
        schema_for_policy("lerobot", inputs, (7,))
    msg = str(info.value)
    assert "\n" not in msg and "'observation.images.wrist_image'" in msg and "schema 'lerobot'" in msg
    assert "'lerobot_image'" in msg and "'ipec'" in msg  # the schemas that would fit
    with pytest.raises(ConfigError, match=r"'observation\.state\.joint' of shape \(6,\).*7 joints"):
        bad = {**inputs, "observation.state.joint": PolicyFeature(FeatureType.STATE, (6,))}
        schema_for_policy("lerobot_image", bad, (7,))
    with pytest.raises(ConfigError, match=r"'observation\.state\.joint'.*schema 'ipec' does not provide"):
        schema_for_policy("ipec", inputs, (7,))


def test_a_lerobot_image_observation_carries_the_joint_positions() -> None:
    import numpy as np
    import torch

    from cl_vla.envs.libero_schema import AGENTVIEW, SCHEMAS, WRIST, to_policy_batch

    rng = np.random.default_rng(0)
    obs = {
        "pixels": {cam: rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8) for cam in (AGENTVIEW, WRIST)},
        "eef_pos": rng.normal(size=(2, 3)),
        "eef_quat": np.tile([0.0, 0.0, 0.0, 1.0], (2, 1)),
        "gripper_qpos": rng.normal(size=(2, 2)),
        "joint_pos": rng.normal(size=(2, 7)),
    }
    batch = to_policy_batch(obs, SCHEMAS["lerobot_image"])
    assert set(batch) == {
        *SCHEMAS["lerobot_image"].camera_keys,
        "observation.state",
        "observation.state.joint",
    }
    torch.testing.assert_close(
        batch["observation.state.joint"], torch.tensor(obs["joint_pos"], dtype=torch.float32)
    )
    assert "observation.state.joint" not in to_policy_batch(obs, SCHEMAS["ipec"])


def test_a_synthetic_lerobot_image_dataset_has_the_hub_sets_features(tmp_path: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset

    spec = SyntheticSpec(("pick", "place"), episodes_per_task=1, frames_per_episode=2, image_size=16)
    spec = SyntheticSpec(**{**spec.__dict__, "schema": "lerobot_image"})
    root = write_synthetic_dataset(tmp_path / "ds", "cl_vla_tests/lerobot_image", spec)
    info = json.loads((root / "meta" / "info.json").read_text())
    assert set(LIBERO_10_IMAGE_FEATURES) <= set(info["features"])
    item = LeRobotDataset("cl_vla_tests/lerobot_image", root=root)[0]
    assert tuple(item["observation.state.joint"].shape) == (7,)
    assert SyntheticSpec(("pick",)).schema == "ipec"  # the keys synthetic datasets always had


# ---- the image size LIBERO renders at -----------------------------------------------------------------


def _evaluator(monkeypatch, size: int, render_size=None):
    from types import SimpleNamespace

    from lerobot.configs.types import FeatureType, PolicyFeature

    import cl_vla.envs.libero_eval as le

    monkeypatch.setattr(le, "check_libero_available", lambda *a: None)
    monkeypatch.setattr(le, "resolve_task_ids", lambda suite, env_tasks, n: list(range(n)))
    img = PolicyFeature(FeatureType.VISUAL, (3, size, size))
    policy_cfg = SimpleNamespace(
        input_features={
            "observation.images.image": img,
            "observation.images.wrist_image": img,
            "observation.state": PolicyFeature(FeatureType.STATE, (8,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))},
    )
    eval_cfg = SimpleNamespace(
        episodes=1, init_states=None, max_episode_steps=3, seed=0, timeout_s=None, videos=0, num_workers=0
    )
    return le.LiberoEvaluator("libero_spatial", None, ["a"], policy_cfg, eval_cfg, render_size=render_size)


def test_libero_renders_at_the_size_the_policy_was_trained_on(monkeypatch) -> None:
    ev = _evaluator(monkeypatch, 256)  # the hub sets' 256 px, not LiberoEnv's default 360
    assert (ev.settings.height, ev.settings.width) == (256, 256)


def test_cameras_read_resized_are_rendered_at_their_recorded_size_and_resized_as_in_training(
    monkeypatch,
) -> None:
    from types import SimpleNamespace

    import numpy as np
    import torch

    from cl_vla.data.alignment import recorded_camera_size, resize_image
    from cl_vla.data.cross_sequence import SourceSpec
    from cl_vla.envs.libero_schema import AGENTVIEW, WRIST

    # A sequence across datasets reading 256 px cameras at task_sequence.image_size=[32, 32].
    meta = SimpleNamespace(fps=20, features=LIBERO_10_IMAGE_FEATURES)
    assert recorded_camera_size([meta], [SourceSpec("a", "lerobot/libero_10_image")]) == (256, 256)
    ev = _evaluator(monkeypatch, 32, render_size=(256, 256))
    assert (ev.settings.height, ev.settings.width) == (256, 256)
    rng = np.random.default_rng(0)
    obs = {
        "pixels": {cam: rng.integers(0, 255, (1, 256, 256, 3), dtype=np.uint8) for cam in (AGENTVIEW, WRIST)},
        "eef_pos": np.zeros((1, 3)),
        "eef_quat": np.tile([0.0, 0.0, 0.0, 1.0], (1, 1)),
        "gripper_qpos": np.zeros((1, 2)),
    }
    batch = ev._policy_batch(obs, SimpleNamespace(device=torch.device("cpu")))
    rendered = torch.from_numpy(obs["pixels"][AGENTVIEW][:, ::-1, ::-1].copy()).permute(0, 3, 1, 2) / 255.0
    assert tuple(batch["observation.images.image"].shape) == (1, 3, 32, 32)
    torch.testing.assert_close(batch["observation.images.image"], resize_image(rendered, (32, 32)))


def test_a_saved_vla_of_another_libero_schema_than_the_dataset_is_one_sentence() -> None:
    from types import SimpleNamespace

    from lerobot.configs.types import FeatureType, PolicyFeature

    from cl_vla.policies.vla_checks import check_vla_features

    img = PolicyFeature(FeatureType.VISUAL, (3, 256, 256))
    state = PolicyFeature(FeatureType.STATE, (8,))
    # e.g. a SmolVLA fine-tuned on lerobot/libero (image + image2), then trained on lerobot/libero_10_image.
    saved = SimpleNamespace(
        type="smolvla",
        input_features={
            "observation.images.image": img,
            "observation.images.image2": img,
            "observation.state": state,
        },
        max_state_dim=32,
        max_action_dim=32,
    )
    data = _policy_inputs(LIBERO_10_IMAGE_FEATURES)
    with pytest.raises(DataError) as info:
        check_vla_features(saved, data, "lerobot/libero_10_image", saved=True)
    msg = str(info.value)
    assert "\n" not in msg and "lacks camera 'observation.images.image2'" in msg
    assert "schema 'lerobot''s, the dataset's 'lerobot_image''s" in msg
