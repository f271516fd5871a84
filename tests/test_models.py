"""The ``model`` group: offline choices train one step on real data; hub VLAs and bad input fail clearly."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from cl_vla.errors import ConfigError, DataError
from cl_vla.policies.configs import build_policy_config, model_choices
from conftest import CONF_DIR

HUB_MODELS = ["smolvla", "pi0", "pi05", "groot"]
BATCH = 4


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Keep the step's time predictable on a shared 2-core machine (see test_tiny_vla.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def model_yaml(name: str, **overrides) -> dict:
    """``conf/model/<name>.yaml`` as a plain dict, as ``prepare_data`` hands it over."""
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    return {**OmegaConf.to_container(cfg, resolve=True), **overrides}


def open_meta(root: Path, repo_id: str):
    from cl_vla.data.streams import open_dataset

    return open_dataset(repo_id, root).meta


@pytest.fixture(scope="module")
def diffusion_dataset(synthetic_dataset_factory) -> tuple[Path, str]:
    """64x64 frames: the diffusion policy's ResNet + spatial softmax needs more than the 16x16 fixture."""
    root, repo_id, _ = synthetic_dataset_factory(
        ["pick up the bowl", "open the drawer"], image_size=64, episodes_per_task=2, frames_per_episode=6
    )
    return root, repo_id


def fake_meta(features: dict, repo_id: str = "cl_vla_tests/fake") -> SimpleNamespace:
    """What ``build_policy_config`` reads of a ``LeRobotDatasetMetadata``: its features and repo id."""
    return SimpleNamespace(features=features, repo_id=repo_id)


# ---- offline choices: config -> policy -> processors -> one training step ------------------------------


@pytest.mark.parametrize("name", ["tiny_vla", "act", "diffusion"])
def test_model_choice_trains_one_step(name: str, request) -> None:
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from torch.utils.data import default_collate

    from cl_vla.data.streams import open_dataset

    if name == "diffusion":
        root, repo_id = request.getfixturevalue("diffusion_dataset")
    else:
        root, repo_id, _ = request.getfixturevalue("synthetic_libero")
    meta = open_meta(root, repo_id)

    torch.manual_seed(0)
    cfg = build_policy_config(model_yaml(name), meta)
    assert cfg.type == name
    assert set(cfg.output_features) == {"action"}
    assert "observation.state" in cfg.input_features
    policy = make_policy(cfg, ds_meta=meta)
    preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)

    ds = open_dataset(repo_id, root, resolve_delta_timestamps(cfg, meta))
    batch = preprocessor(default_collate([ds[i] for i in range(BATCH)]))
    assert batch["action"].shape[:2] == (BATCH, len(cfg.action_delta_indices))

    policy.train()
    loss, _ = policy.forward(batch)
    assert loss.ndim == 0 and torch.isfinite(loss), f"model={name}: loss {loss}"
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.requires_grad and p.grad is not None]
    assert grads, f"model={name}: backward reached no parameter"
    assert all(torch.isfinite(g).all() for g in grads), f"model={name}: non-finite gradient"


# ---- hub VLAs without their weights ----------------------------------------------------------------------


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_without_weights_names_them(name: str) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    cfg = model_yaml(name)
    with pytest.raises(ConfigError) as info:
        build_policy_config(cfg, fake_meta({}))
    msg = str(info.value)
    assert repr(cfg["pretrained_path"]) in msg
    assert f"model={name}" in msg
    assert "model.pretrained_path" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_config_class_imports_without_extras(name: str) -> None:
    """Only the config class is needed to reach the weights check; it must import without the extras,
    or the user would see an ImportError instead of the sentence about weights."""
    import lerobot.policies  # noqa: F401
    from lerobot.configs.policies import PreTrainedConfig

    cls = PreTrainedConfig.get_choice_class(name)
    assert cls(device="cpu").type == name


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_missing_local_weights_name_the_path(tmp_path: Path, monkeypatch, offline: bool) -> None:
    if not offline:
        monkeypatch.delenv("HF_HUB_OFFLINE")  # a local path fails before any hub is asked
    absent = tmp_path / "no_weights_here"
    with pytest.raises(ConfigError, match=r"model\.pretrained_path") as info:
        build_policy_config(model_yaml("smolvla", pretrained_path=str(absent)), fake_meta({}))
    msg = str(info.value)
    assert repr(str(absent)) in msg
    assert ("HF_HUB_OFFLINE=1" in msg) is offline


# ---- bad model config ------------------------------------------------------------------------------------


def test_unknown_model_type_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"model\.type='not_a_policy' is unknown") as info:
        build_policy_config({"type": "not_a_policy"}, fake_meta({}))
    msg = str(info.value)
    for choice in model_choices():
        assert repr(choice) in msg
    assert {"tiny_vla", "act", "diffusion", *HUB_MODELS} <= set(model_choices())


def test_unknown_model_field_is_named() -> None:
    with pytest.raises(ConfigError, match=r"model=tiny_vla has no field\(s\) \['not_a_field'\]") as info:
        build_policy_config(model_yaml("tiny_vla", not_a_field=1), fake_meta({}))
    assert "\n" not in str(info.value)


# ---- datasets a policy cannot learn from -------------------------------------------------------------------


def _features(*keys: str) -> dict:
    from cl_vla.data.synthetic import libero_features

    feats = libero_features(16)
    feats["timestamp"] = {"dtype": "float32", "shape": (1,), "names": None}
    feats["observation.environment_state"] = {"dtype": "float32", "shape": (4,), "names": None}
    return {k: feats[k] for k in (*keys, "timestamp")}


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        (("observation.images.image", "observation.state"), "has no 'action' feature"),
        (("action",), "has neither image"),
        (("action", "observation.environment_state"), "has neither image"),
    ],
    ids=["no_action", "action_only", "env_state_only"],
)
def test_dataset_without_needed_features(keys: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(DataError, match=fragment) as info:
        build_policy_config(model_yaml("tiny_vla"), fake_meta(_features(*keys), repo_id="me/odd_dataset"))
    msg = str(info.value)
    assert "'me/odd_dataset'" in msg
    assert "\n" not in msg


def test_image_feature_without_three_dims_is_one_sentence() -> None:
    feats = _features("action", "observation.state")
    feats["observation.images.image"] = {"dtype": "image", "shape": (16, 16), "names": ["height", "width"]}
    with pytest.raises(DataError, match="has a feature lerobot cannot use") as info:
        build_policy_config(model_yaml("tiny_vla"), fake_meta(feats, repo_id="me/odd_dataset"))
    assert "observation.images.image" in str(info.value) and "\n" not in str(info.value)
