"""Meta-World: recorded demonstrations, closed-loop evaluation (eval=sim), and their bad-input messages.

The slow tests record two tasks (a few short episodes, 32 px images) once per session and train on them
for a few steps with closed-loop evaluation in real simulators; the rest are seconds-long checks.
"""

from __future__ import annotations

import json
import os
import shutil
import types

import numpy as np
import pytest

from conftest import CONF_DIR, last_line, run_train

TASKS = ["reach-v3", "button-press-topdown-v3"]
SEQ_NAME = "mw_test2"


def _instructions() -> list[str]:
    from cl_vla.envs.metaworld import task_description

    return [task_description(t) for t in TASKS]


def _overrides() -> list[str]:
    """The sequence and recording settings shared by the fixture and the training run (same cache)."""
    tasks = ",".join(f"'{t}'" for t in _instructions())
    return [
        "task_sequence=custom",
        f"task_sequence.name={SEQ_NAME}",
        "task_sequence.suite=metaworld",
        f"task_sequence.tasks=[{tasks}]",
        f"task_sequence.env_tasks=[{','.join(TASKS)}]",
        "data=metaworld",
        "data.record.episodes_per_task=3",
        "data.record.image_size=32",
        "data.record.max_steps=150",
        "data.heldout_fraction=0.34",
    ]


@pytest.fixture(scope="module")
def recorded():
    """``(cfg, root, seconds)``: the two-task dataset, recorded through the CLI's code path."""
    import time

    from hydra import compose, initialize_config_dir

    from cl_vla.config.schema import register_configs
    from cl_vla.data.task_sequences import TaskSequence
    from cl_vla.envs.metaworld_record import ensure_recorded

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*_overrides(), "output_dir=."])
    from omegaconf import OmegaConf

    seq = TaskSequence.from_mapping(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    tic = time.perf_counter()
    root = ensure_recorded(cfg.data, seq, progress=False)
    return cfg, root, time.perf_counter() - tic


@pytest.mark.slow
def test_recording_two_tasks_gives_a_valid_dataset_whose_tasks_resolve(recorded):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from cl_vla.data.streams import build_continual_data
    from cl_vla.data.task_sequences import TaskSequence
    from cl_vla.envs.metaworld_record import SETTINGS_FILE, ensure_recorded

    cfg, root, _ = recorded
    ds = LeRobotDataset(cfg.data.repo_id, root=root)
    assert ds.num_episodes == 6
    assert ds.meta.features["observation.images.corner2"]["shape"] == (32, 32, 3)
    assert ds.meta.features["observation.state"]["shape"] == (4,)
    assert ds.meta.features["observation.environment_state"]["shape"] == (39,)
    assert ds.meta.features["action"]["shape"] == (4,)
    frame = ds[0]
    assert frame["observation.images.corner2"].shape == (3, 32, 32)
    assert float(frame["action"].abs().max()) <= 1.0
    # Episodes are successful expert runs: short of Meta-World's 500 steps and of max_steps.
    assert all(0 < n <= 150 for n in ds.meta.episodes["length"])

    seq = TaskSequence(SEQ_NAME, tuple(_instructions()), "metaworld", tuple(TASKS))
    data = build_continual_data(ds, seq, heldout_fraction=0.34)
    assert data.task_names == _instructions()
    assert [len(s.train_episodes) + len(s.heldout_episodes) for s in data.streams] == [3, 3]
    settings = json.loads((root / SETTINGS_FILE).read_text())
    assert set(settings["seeds_tried"]) == set(TASKS)

    # Cached: the same settings reuse the dataset without recording again.
    mtime = (root / SETTINGS_FILE).stat().st_mtime_ns
    assert ensure_recorded(cfg.data, seq, progress=False) == root
    assert (root / SETTINGS_FILE).stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_short_training_with_closed_loop_evaluation(recorded, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *_overrides(),
        "eval=sim",
        "eval.episodes=2",
        "eval.max_episode_steps=15",
        "eval.videos=1",
        "eval.num_workers=1",
        "algorithm=er",
        "model.image_size=32",
        "continual_learning.steps_per_task=4",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.progress_bar=false",
        "trainer.warmup_steps=1",
        "logger=none",
    ]
    proc = run_train([*args, f"hydra.run.dir={run_dir}"], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    R = np.array(results["matrix"], dtype=float)
    assert R.shape == (2, 2) and np.isfinite(R).all()
    assert ((R >= 0) & (R <= 1)).all()
    assert results["higher_is_better"] is True and results["metric_name"] == "success_rate"
    loss = np.array(results["extra"]["heldout_action_loss"]["matrix"], dtype=float)
    assert loss.shape == (2, 2) and np.isfinite(loss).all() and (loss > 0).all()
    sim = results["extra"]["sim"]
    assert sim["env_steps"] > 0 and sim["episodes"] == 3 * 2 * 2  # (baseline + 2 tasks) x 2 tasks x 2 eps
    assert len(list((run_dir / "videos").rglob("*.mp4"))) == 3 * 2
    assert "success rate" in proc.stdout

    # Resumed at the task boundary (a copy of the run after task 0), it ends with the same success
    # matrix and the same held-out loss matrix (restored from the checkpoint, then extended).
    boundary = tmp_path / "boundary"
    shutil.copytree(run_dir, boundary)
    (boundary / "results.json").unlink()
    ckpt = boundary / "checkpoints" / "task_00.ckpt"
    resumed = run_train([*args, f"hydra.run.dir={tmp_path / 'h'}", f"resume={ckpt}"], timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((boundary / "results.json").read_text())
    np.testing.assert_array_equal(np.array(again["matrix"], dtype=float), R)
    np.testing.assert_allclose(
        np.array(again["extra"]["heldout_action_loss"]["matrix"], dtype=float), loss, rtol=0, atol=1e-6
    )
    assert again["extra"]["baseline"] == results["extra"]["baseline"]


def test_unknown_task_name_suggests_close_ones():
    from cl_vla.envs.metaworld import check_task_names
    from cl_vla.errors import ConfigError

    assert check_task_names(["metaworld-reach-v3"]) == ["reach-v3"]
    with pytest.raises(ConfigError) as err:
        check_task_names(["reach-v3", "button-press-top-down-v3"])
    msg = str(err.value)
    assert "'button-press-top-down-v3'" in msg and "'button-press-topdown-v3'" in msg
    assert len(msg.splitlines()) == 1


def test_unknown_task_name_stops_the_cli_before_recording(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import run_main
    from cl_vla.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "task_sequence=mw_short",
                "task_sequence.env_tasks=[reach-v2,button-press-topdown-v3,drawer-close-v3]",
                "data=metaworld",
                f"data.root={tmp_path / 'never'}",
                "eval=sim",
                "logger=none",
                f"output_dir={tmp_path / 'run'}",
            ],
        )
    with pytest.raises(SystemExit) as info:
        run_main(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert last_line(err).startswith("error: ") and "did you mean 'reach-v3'" in err
    assert not (tmp_path / "never").exists()


def test_rendering_unavailable_is_one_sentence_naming_the_fix(monkeypatch):
    import mujoco

    from cl_vla.envs.metaworld import ObservationSpec, RenderingError, SimWorkers

    def no_gl(*args, **kwargs):
        raise RuntimeError("Cannot initialize a EGL device display. This likely means that your EGL ...")

    monkeypatch.setattr(mujoco, "Renderer", no_gl)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    with SimWorkers(ObservationSpec(height=16, width=16), num_workers=0) as workers:
        workers.submit(0, "reset", "reach-v3", [1_000_000])
        with pytest.raises(RenderingError) as err:
            workers.result(0)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and msg.endswith(".")
    assert "MUJOCO_GL=egl" in msg and "libegl1" in msg and "libgl1-mesa-dri" in msg and "osmesa" in msg


def test_policy_features_that_metaworld_cannot_provide_are_refused():
    from lerobot.configs.types import FeatureType, PolicyFeature

    from cl_vla.envs.metaworld import spec_from_policy_features
    from cl_vla.errors import ConfigError

    ok = spec_from_policy_features(
        {
            "observation.images.corner2": PolicyFeature(FeatureType.VISUAL, (3, 48, 48)),
            "observation.state": PolicyFeature(FeatureType.STATE, (4,)),
        },
        (4,),
    )
    assert ok.cameras == ("corner2",) and (ok.height, ok.width) == (48, 48) and not ok.environment_state

    libero_like = {
        "observation.images.image": PolicyFeature(FeatureType.VISUAL, (3, 64, 64)),
        "observation.state": PolicyFeature(FeatureType.STATE, (8,)),
    }
    with pytest.raises(ConfigError, match=r"'observation\.images\.image'") as err:
        spec_from_policy_features(libero_like, (7,))
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ConfigError, match=r"'observation.state' of shape \(8,\)"):
        spec_from_policy_features({"observation.state": PolicyFeature(FeatureType.STATE, (8,))}, (4,))
    with pytest.raises(ConfigError, match=r"actions of shape \(7,\)"):
        spec_from_policy_features({"observation.state": PolicyFeature(FeatureType.STATE, (4,))}, (7,))


def test_evaluation_seeds_must_be_disjoint_from_the_demonstrations():
    from lerobot.configs.types import FeatureType, PolicyFeature

    from cl_vla.envs.metaworld_eval import MetaworldEvaluator
    from cl_vla.errors import ConfigError

    policy_cfg = types.SimpleNamespace(
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (4,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
    )
    eval_cfg = types.SimpleNamespace(
        episodes=3, max_episode_steps=20, seed=5, timeout_s=None, videos=0, num_workers=0
    )
    args = (["reach-v3"], ["Reach"], policy_cfg, eval_cfg)
    with pytest.raises(ConfigError, match=r"choose eval\.seed above 9"):
        MetaworldEvaluator(*args, demo_seeds={"reach-v3": list(range(10))})
    MetaworldEvaluator(*args, demo_seeds={"reach-v3": [0, 1, 2]}).close()


def test_mujoco_gl_defaults_to_egl_without_a_display(monkeypatch):
    from cl_vla.envs.metaworld import default_mujoco_gl

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    default_mujoco_gl()
    assert os.environ["MUJOCO_GL"] == "egl"
