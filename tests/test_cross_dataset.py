"""Task sequences across datasets: ``experiment=smoke_cross`` reads three tasks from three synthetic
datasets of different schemas (feature names, image sizes), concatenated behind one index space.

Checked here: it trains with several algorithms, replay stores 8-byte references into either dataset
and mixes them in one batch, it resumes exactly (mid-task and at a task boundary), normalization
statistics pool each dataset's stored statistics, a misaligned pair is refused in one sentence, and
the cross-suite LIBERO recipe composes and fails offline with one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import free_port, join_ranks, session_tmp

pytestmark = pytest.mark.slow

STEPS = 4  # per task; a mid-task checkpoint every 2 steps


def _data_root() -> Path:
    return session_tmp() / "datasets" / "cross_demo"


def _overrides(algo: str, *extra: str, root: Path | None = None) -> list[str]:
    return [
        "experiment=smoke_cross",
        f"algorithm={algo}",
        f"data.root={root or _data_root()}",
        "data.synthetic.episodes_per_task=3",
        "data.synthetic.frames_per_episode=8",
        "data.synthetic.image_size=16",
        "task_sequence.datasets.wrist_cam.synthetic.image_size=12",  # resized to 16 when read
        "task_sequence.datasets.hdf5_names.synthetic.image_size=20",  # resized to 16 when read
        "data.batch_size=4",
        "data.num_workers=0",
        "model.image_size=16",
        f"continual_learning.steps_per_task={STEPS}",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.warmup_steps=2",
        "trainer.progress_bar=false",
        *extra,
    ]


class Crash(RuntimeError):
    """Stands for a killed process, raised inside the fit after a mid-task checkpoint."""


def _crash_in_last_task(algorithm) -> None:
    inner = algorithm.observe

    def observe(batch, **kwargs):
        inner(batch, **kwargs)
        module = kwargs["module"]
        if module.task == 2 and module.step_in_task() == 3:
            raise Crash("crash at task 2, step 3")

    algorithm.observe = observe


def _final(run_dir: Path) -> tuple[np.ndarray, dict[str, torch.Tensor], str]:
    R = np.array(json.loads((run_dir / "results.json").read_text())["matrix"], dtype=float)
    ckpt = torch.load(run_dir / "checkpoints" / "task_02.ckpt", map_location="cpu", weights_only=True)
    return R, ckpt["state_dict"], json.dumps(ckpt["cl_vla"]["algorithm"], sort_keys=True, default=str)


def _assert_same_run(got: Path, ref: Path, what: str) -> None:
    r_got, w_got, a_got = _final(got)
    r_ref, w_ref, a_ref = _final(ref)
    np.testing.assert_allclose(r_got, r_ref, rtol=0, atol=1e-6, err_msg=f"{what}: R differs")
    for k in w_ref:
        torch.testing.assert_close(w_got[k], w_ref[k], rtol=0, atol=1e-6, msg=f"{what}: {k}")
    assert a_got == a_ref, f"{what}: the algorithm's state differs"


def test_er_replays_across_datasets_and_resumes_exactly(tmp_path: Path) -> None:
    from torch.utils.data import default_collate

    from cl_vla.training.in_process import run_in_process

    overrides = _overrides("er")
    ref = tmp_path / "ref"
    results, algorithm, data = run_in_process(overrides, ref)
    R = np.asarray(results["matrix"], dtype=float)
    assert R.shape == (3, 3) and np.isfinite(R).all()  # every task evaluated after every task

    ds = data.dataset
    assert [s.extra["dataset"] for s in data.streams] == ["main_cam", "wrist_cam", "hdf5_names"]
    assert len(ds.sources) == 3
    # References are global int64 indices, 8 bytes each whatever dataset they point into: each task's
    # lie in its own dataset's range of the one index space.
    refs = {t: algorithm.memory.refs(t) for t in algorithm.get_task_ids()}
    assert sorted(refs) == [0, 1, 2]
    for t, r in refs.items():
        assert r.dtype == np.int64 and r.itemsize == 8
        assert ((r >= ds.offsets[t]) & (r < ds.offsets[t + 1])).all(), f"task {t}"
    # One replay batch mixes the three datasets: one feature space, cameras at one size.
    picked = [int(i) for t in (0, 1, 2) for i in refs[t][:2]]
    batch = default_collate([ds[i] for i in picked])
    for camera in ("observation.images.image", "observation.images.wrist_image"):
        assert batch[camera].shape == (6, 3, 16, 16), camera
    assert batch["observation.state"].shape[-1] == 8 and batch["action"].shape[-1] == 7
    assert batch["index"].tolist() == picked
    assert len(set(batch["task_index"].tolist())) == 3  # tasks and episodes are numbered globally too
    assert len(set(batch["episode_index"].tolist())) >= 3

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        run_in_process(overrides, cut, algorithm_hook=_crash_in_last_task)
    run_in_process([*overrides, f"resume={cut}"], tmp_path / "unused")
    _assert_same_run(cut, ref, "resumed mid-task")

    boundary = tmp_path / "boundary"
    shutil.copytree(ref, boundary)
    (boundary / "results.json").unlink()
    run_in_process([*overrides, f"resume={boundary / 'checkpoints' / 'task_01.ckpt'}"], tmp_path / "unused2")
    _assert_same_run(boundary, ref, "resumed at the boundary between the datasets")


@pytest.mark.parametrize("algo", ["sequential", "derpp", "agem"])
def test_other_algorithms_run_across_datasets(algo: str, tmp_path: Path) -> None:
    from cl_vla.training.in_process import run_in_process

    results, _, _ = run_in_process(_overrides(algo), tmp_path)
    R = np.asarray(results["matrix"], dtype=float)
    assert R.shape == (3, 3) and np.isfinite(R).all()


def _first_step(value: torch.Tensor) -> torch.Tensor:
    return value[0] if value.dim() == 2 else value


def test_normalization_pools_the_datasets_stored_statistics(tmp_path: Path) -> None:
    """seen_tasks after task 1 = statistics of the frames of both datasets' training episodes."""
    from cl_vla.data.stats import select_stats
    from cl_vla.training.in_process import compose_run

    _, _, data, _ = compose_run(_overrides("sequential"), tmp_path)
    train_eps = [s.train_episodes for s in data.streams]
    seen = select_stats("seen_tasks", data.dataset.meta, train_eps, 1)
    ranges = data.dataset.episode_frame_ranges()
    frames = [i for t in (0, 1) for e in train_eps[t] for i in range(*ranges[e])]
    for key in ("observation.state", "action"):
        values = torch.stack([_first_step(data.dataset[i][key]) for i in frames]).double()  # chunk: 1st step
        np.testing.assert_allclose(seen[key]["mean"], values.mean(0).numpy(), atol=1e-5, err_msg=key)
        np.testing.assert_allclose(seen[key]["max"], values.max(0).values.numpy(), atol=1e-6, err_msg=key)
    whole = select_stats("dataset", data.dataset.meta, train_eps, 0)
    counts = [int(np.asarray(m.stats["action"]["count"]).sum()) for m in data.dataset.meta.metas]
    assert int(np.asarray(whole["action"]["count"]).sum()) == sum(counts)  # every frame of both datasets
    first = select_stats("first_task", data.dataset.meta, train_eps, 2)
    assert int(np.asarray(first["action"]["count"]).sum()) == data.streams[0].num_train_frames


def test_a_dataset_left_without_a_feature_of_the_first_is_refused_in_one_sentence(tmp_path: Path) -> None:
    from cl_vla.errors import DataError
    from cl_vla.training.in_process import compose_run

    with pytest.raises(DataError) as info:
        compose_run(
            _overrides("sequential", "+task_sequence.datasets.wrist_cam.rename.action=null"), tmp_path
        )
    msg = str(info.value)
    assert "'wrist_cam'" in msg and "no feature 'action'" in msg and "rename" in msg
    assert "\n" not in msg


def _meta(fps=10, action=7, state=8, names=None, camera="observation.images.image"):
    img = {"dtype": "image", "shape": (32, 32, 3), "names": ["height", "width", "channels"]}
    return SimpleNamespace(
        fps=fps,
        features={
            camera: img,
            "observation.state": {"dtype": "float32", "shape": (state,), "names": None},
            "action": {"dtype": "float32", "shape": (action,), "names": names},
        },
    )


@pytest.mark.parametrize(
    ("other", "fragment"),
    [
        (_meta(action=6), "'action' of shape [6]"),
        (_meta(state=9), "'observation.state' of shape [9]"),
        (_meta(fps=20), "fps_rule=own_frames"),
        (_meta(names=["j0", "j1", "j2", "j3", "j4", "j5", "grip"]), "a different meaning"),
        (_meta(camera="observation.images.front"), "has no feature 'observation.images.image'"),
    ],
)
def test_misaligned_pairs_are_refused_in_one_sentence(other, fragment: str) -> None:
    from cl_vla.data.alignment import feature_space
    from cl_vla.data.cross_sequence import SourceSpec
    from cl_vla.errors import DataError

    first = _meta(names=["x", "y", "z", "rx", "ry", "rz", "grip"])
    specs = [SourceSpec("a", "me/a"), SourceSpec("b", "me/b")]
    with pytest.raises(DataError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        feature_space([first, other], specs, None, "same")
    msg = str(info.value)
    assert "'b'" in msg and "me/b" in msg and "\n" not in msg


def test_libero_sets_labelled_10_and_20_fps_align_once_the_true_rate_is_declared() -> None:
    from cl_vla.data.alignment import feature_space
    from cl_vla.data.cross_sequence import SourceSpec, parse_cross_sequence
    from cl_vla.errors import ConfigError, DataError

    # lerobot/libero labels LIBERO's 20 Hz control steps 10 fps; lerobot/libero_*_image labels them 20.
    hub, image_set = _meta(fps=10), _meta(fps=20)
    plain = [SourceSpec("hub", "lerobot/libero"), SourceSpec("img", "lerobot/libero_10_image")]
    with pytest.raises(DataError, match=r"task_sequence\.datasets\.<name>\.fps") as info:
        feature_space([hub, image_set], plain, None, "same")
    assert "\n" not in str(info.value) and "at 10 fps" in str(info.value)
    node = {
        "name": "two_labels",
        "datasets": {
            "hub": {"repo_id": "lerobot/libero", "fps": 20},
            "img": {"repo_id": "lerobot/libero_10_image"},
        },
        "tasks": [{"dataset": "hub"}, {"dataset": "img"}],
    }
    seq = parse_cross_sequence(node)
    assert [s.fps for s in seq.sources] == [20.0, None]
    space = feature_space([hub, image_set], list(seq.sources), None, "same")
    assert set(space) == {"observation.images.image", "observation.state", "action"}
    # A declaration that still disagrees is refused as before, with both rates named.
    wrong = [SourceSpec("hub", "lerobot/libero", fps=15.0), plain[1]]
    with pytest.raises(DataError, match=r"records at 20 fps but 'hub' at 15 fps"):
        feature_space([hub, image_set], wrong, None, "same")
    for bad in (0, -5, "fast", True):
        node["datasets"]["hub"]["fps"] = bad
        with pytest.raises(ConfigError, match=r"task_sequence\.datasets\.hub\.fps=.* is not allowed"):
            parse_cross_sequence(node)


def test_a_rename_and_a_chosen_image_size_align_the_pair() -> None:
    from cl_vla.data.alignment import feature_space
    from cl_vla.data.cross_sequence import SourceSpec

    other = _meta(camera="observation.images.front", fps=20)
    specs = [
        SourceSpec("a", "me/a"),
        SourceSpec("b", "me/b", rename={"observation.images.front": "observation.images.image"}),
    ]
    space = feature_space([_meta(), other], specs, (24, 20), "own_frames")
    assert space["observation.images.image"]["shape"] == (24, 20, 3)
    assert set(space) == {"observation.images.image", "observation.state", "action"}


def test_cross_suite_libero_recipe_composes_and_fails_offline_in_one_sentence(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import prepare_data, validate_config
    from cl_vla.config.schema import register_configs
    from cl_vla.data.cross_sequence import parse_cross_sequence
    from cl_vla.errors import DataError
    from cl_vla.paths import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "config", overrides=["task_sequence=libero_cross_suite", "data=libero", f"output_dir={tmp_path}"]
        )
    cfg = validate_config(cfg)
    seq = parse_cross_sequence(cfg.task_sequence)
    assert [s.name for s in seq.sources] == ["spatial", "object", "goal", "libero_10"]
    assert len(seq.tasks) == 40 and [t.dataset for t in seq.tasks[9:11]] == ["spatial", "object"]
    with pytest.raises(DataError) as info:
        prepare_data(cfg)
    msg = str(info.value)
    assert "IPEC-COMMUNITY/libero_spatial_no_noops_1.0.0_lerobot" in msg
    assert "task_sequence.datasets.spatial.root" in msg and "\n" not in msg


def test_env_tasks_pair_with_the_expanded_tasks() -> None:
    from cl_vla.data.cross_sequence import parse_cross_sequence
    from cl_vla.errors import ConfigError

    node = {
        "name": "mw_two",
        "datasets": {"a": {"repo_id": "me/a"}, "b": {"repo_id": "me/b"}},
        "tasks": [{"dataset": "a", "tasks": ["reach", "push"]}, {"dataset": "b", "instruction": "pick"}],
        "env_tasks": ["reach-v3", "push-v3", "pick-place-v3"],
    }
    seq = parse_cross_sequence(node).as_task_sequence("metaworld")
    assert seq.tasks == ("reach", "push", "pick") and seq.env_tasks == (
        "reach-v3",
        "push-v3",
        "pick-place-v3",
    )
    with pytest.raises(ConfigError, match="3 tasks but 2 env_tasks"):
        parse_cross_sequence({**node, "env_tasks": ["reach-v3", "push-v3"]})


def test_a_cross_dataset_sequence_is_given_on_the_command_line(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import validate_config
    from cl_vla.config.schema import register_configs
    from cl_vla.data.cross_sequence import parse_cross_sequence
    from cl_vla.paths import conf_dir

    register_configs()
    overrides = [
        "task_sequence=custom",
        "task_sequence.name=mine",
        "+task_sequence.datasets.pick={repo_id: me/so101_pick, root: /data/pick}",
        "+task_sequence.datasets.stack={repo_id: me/so101_stack, "
        "rename: {observation.images.top: observation.images.front}}",
        "task_sequence.tasks=[{dataset: pick}, {dataset: stack, instruction: 'stack the red cube'}]",
        f"output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = validate_config(compose("config", overrides=overrides))
    seq = parse_cross_sequence(cfg.task_sequence)
    assert [(t.dataset, t.select, t.name) for t in seq.tasks] == [
        ("pick", (), "pick"),
        ("stack", ("stack the red cube",), "stack the red cube"),
    ]
    assert seq.source("pick").root == "/data/pick"
    assert seq.source("stack").rename == {"observation.images.top": "observation.images.front"}


def _ddp_rank(rank: int, port: int, out: str, root: str) -> None:
    from conftest import TEST_ENV

    os.environ.update(
        TEST_ENV,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),  # Lightning joins this process group instead of launching one
        NODE_RANK="0",
        WORLD_SIZE="2",
    )
    from rich.console import Console

    from cl_vla.training.in_process import compose_run
    from cl_vla.training.loop import run_continual

    try:
        # The parent's datasets: a spawned process imports conftest anew, with a session folder of its own.
        overrides = [
            *_overrides("er", "trainer=ddp_cpu", root=Path(root)),
            "continual_learning.steps_per_task=3",
        ]
        cfg, algorithm, data, policy_cfg = compose_run(overrides, Path(out) / "run")
        run_continual(cfg, data, policy_cfg, algorithm, console=Console(quiet=True))
    except Exception:
        (Path(out) / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        raise


@pytest.mark.ddp
def test_er_across_datasets_under_ddp_ranks_agree(tmp_path: Path) -> None:
    """Two DDP ranks (gloo) replay across the three datasets; both end with the same replay buffer."""
    import torch.multiprocessing as mp

    from cl_vla.training.in_process import compose_run

    compose_run(_overrides("er"), tmp_path / "write")  # the datasets, written once before the ranks read them
    ctx = mp.start_processes(
        _ddp_rank,
        args=(free_port(), str(tmp_path), str(_data_root())),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    join_ranks(ctx, tmp_path, 600)
    run_dir = tmp_path / "run"
    R = np.array(json.loads((run_dir / "results.json").read_text())["matrix"], dtype=float)
    assert R.shape == (3, 3) and np.isfinite(R).all()
    states = [json.loads((run_dir / "rank_states" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0]["task"] == states[1]["task"] == 2
    assert states[0]["sha256"] == states[1]["sha256"], "the ranks hold different replay buffers"
