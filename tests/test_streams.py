"""Per-task streams of one LeRobot dataset: resolution, episode maps, frame views, splits, statistics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cl_vla.data import TaskFilteredDataset, build_episode_task_map, get_task_sequence, resolve_task_indices
from cl_vla.data.splits import split_episodes
from cl_vla.data.stats import NormalizationChoice, aggregate_episode_stats, select_stats
from cl_vla.data.streams import build_continual_data, open_dataset
from cl_vla.data.synthetic import SETTINGS_FILE, SyntheticSpec, write_synthetic_dataset
from cl_vla.data.task_sequences import TaskSequence, dataset_tasks, episode_frame_ranges
from cl_vla.errors import ConfigError, DataError

SPATIAL = get_task_sequence("libero_spatial")
HELDOUT = 0.3  # 3 episodes per task: 2 train, 1 held out


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(synthetic_libero):
    root, repo_id, _ = synthetic_libero
    return open_dataset(repo_id, root)


@pytest.fixture(scope="module")
def frames(base) -> dict[str, np.ndarray]:
    """The raw columns of every frame, read straight from the dataset's table (no cl_vla code)."""
    cols = ["index", "episode_index", "frame_index", "task_index", "observation.state", "action"]
    raw = base.hf_dataset.select_columns(cols)[:]
    return {c: torch.stack(list(raw[c])).numpy() for c in cols}


@pytest.fixture(scope="module")
def data(base):
    return build_continual_data(base, SPATIAL, heldout_fraction=HELDOUT, split_seed=0)


def _episodes_by_task(frames: dict[str, np.ndarray]) -> dict[int, list[int]]:
    out: dict[int, set[int]] = {}
    for ep, task in zip(frames["episode_index"], frames["task_index"], strict=True):
        out.setdefault(int(task), set()).add(int(ep))
    return {t: sorted(e) for t, e in out.items()}


def _global_indices(frames: dict[str, np.ndarray], episodes) -> np.ndarray:
    mask = np.isin(frames["episode_index"], list(episodes))
    return np.sort(frames["index"][mask])


# ---- resolving the sequence against the dataset -------------------------------------------------------


def test_dataset_task_order_differs_but_streams_follow_the_sequence(base, data, frames) -> None:
    by_text = dataset_tasks(base.meta)
    dataset_order = sorted(by_text, key=by_text.get)
    assert sorted(dataset_order) == sorted(SPATIAL.tasks)
    assert dataset_order != list(SPATIAL.tasks), "the synthetic writer should shuffle the task order"

    indices = resolve_task_indices(SPATIAL, base.meta)
    assert indices != list(range(10))
    assert [s.name for s in data.streams] == list(SPATIAL.tasks)
    assert data.task_names == list(SPATIAL.tasks)
    assert data.num_tasks == 10
    for k, stream in enumerate(data.streams):
        assert stream.position == k
        assert stream.task_index == indices[k] == by_text[SPATIAL.tasks[k]]
        assert stream.env_task == SPATIAL.env_tasks[k]
        ds = data.train_dataset(k)
        assert set(frames["task_index"][ds.frame_indices].tolist()) == {stream.task_index}
        assert ds[0]["task"] == SPATIAL.tasks[k]


def test_resolution_tolerates_case_whitespace_and_period(base) -> None:
    text = SPATIAL.tasks[3]
    seq = TaskSequence(name="loose", tasks=("  " + text.upper().replace(" ", "  ") + ".",))
    assert resolve_task_indices(seq, base.meta) == [dataset_tasks(base.meta)[text]]


def test_tasks_by_dataset_index(base, data) -> None:
    seq = TaskSequence(name="by_index", tasks=(data.streams[4].task_index, SPATIAL.tasks[0]))
    cd = build_continual_data(base, seq, heldout_fraction=HELDOUT)
    assert cd.streams[0].name == SPATIAL.tasks[4]
    assert cd.streams[0].task_index == data.streams[4].task_index
    with pytest.raises(DataError, match=r"Task index 99 of sequence 'bad_index'"):
        resolve_task_indices(TaskSequence(name="bad_index", tasks=(99,)), base.meta)


def test_absent_instruction_is_named(base) -> None:
    seq = TaskSequence(
        name="mine", tasks=(SPATIAL.tasks[0], "pick up the red bowl and place it on the plate")
    )
    with pytest.raises(DataError) as info:
        resolve_task_indices(seq, base.meta)
    msg = str(info.value)
    assert "'pick up the red bowl and place it on the plate'" in msg
    assert "'mine'" in msg
    assert "closest" in msg


def test_dataset_without_task_information(synthetic_libero, tmp_path) -> None:
    root, repo_id, _ = synthetic_libero
    copy = tmp_path / "no_tasks"
    shutil.copytree(root, copy)
    tasks = pd.read_parquet(copy / "meta" / "tasks.parquet")
    tasks.iloc[0:0].to_parquet(copy / "meta" / "tasks.parquet")
    ds = open_dataset(repo_id, copy)
    assert len(ds.meta.tasks) == 0
    with pytest.raises(DataError, match="has no task information") as info:
        build_continual_data(ds, SPATIAL, heldout_fraction=HELDOUT)
    assert repo_id in str(info.value)
    with pytest.raises(DataError, match="has no task information"):
        build_episode_task_map(ds)


def test_missing_dataset_root(tmp_path) -> None:
    with pytest.raises(DataError, match=r"No LeRobot dataset at data\.root=") as info:
        open_dataset("some/dataset", tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


# ---- episode -> task map ------------------------------------------------------------------------------


def test_episode_task_map_matches_frames(base, frames) -> None:
    ep_map = build_episode_task_map(base)
    assert ep_map == _episodes_by_task(frames)
    assert sorted(ep_map) == list(range(10))
    assert all(len(eps) == 3 for eps in ep_map.values())


def test_episode_task_map_reads_only_meta_episodes(synthetic_libero, frames, monkeypatch) -> None:
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata

    root, repo_id, _ = synthetic_libero
    meta = LeRobotDatasetMetadata(repo_id, root=root)

    def no_scan(*args, **kwargs):
        raise AssertionError("build_episode_task_map read a parquet file")

    import datasets
    import pyarrow.parquet as pq

    monkeypatch.setattr(pd, "read_parquet", no_scan)
    monkeypatch.setattr(pq, "read_table", no_scan)
    monkeypatch.setattr(pq, "ParquetFile", no_scan)
    monkeypatch.setattr(datasets, "load_dataset", no_scan)
    assert build_episode_task_map(meta) == _episodes_by_task(frames)


# ---- per-task streams -----------------------------------------------------------------------------


def test_streams_are_disjoint_and_cover_the_dataset(base, data, frames) -> None:
    seen: set[int] = set()
    total_train = total_held = 0
    for k, stream in enumerate(data.streams):
        train, held = data.train_dataset(k), data.heldout_dataset(k)
        assert len(stream.train_episodes) == 2 and len(stream.heldout_episodes) == 1
        assert set(stream.train_episodes).isdisjoint(stream.heldout_episodes)
        assert len(train) == stream.num_train_frames == 16
        assert len(held) == stream.num_heldout_frames == 8
        task_frames = set(train.frame_indices.tolist()) | set(held.frame_indices.tolist())
        assert len(task_frames) == len(train) + len(held)
        assert task_frames.isdisjoint(seen), f"task {k} shares frames with an earlier task"
        seen |= task_frames
        total_train += len(train)
        total_held += len(held)
    assert seen == set(frames["index"].tolist()) == set(range(len(base)))
    assert total_train + total_held == len(base) == 240


def test_revisited_task_keeps_its_split(base, data) -> None:
    seq = TaskSequence(name="revisit", tasks=(SPATIAL.tasks[0], SPATIAL.tasks[1], SPATIAL.tasks[0]))
    cd = build_continual_data(base, seq, heldout_fraction=HELDOUT)
    assert cd.streams[2].task_index == cd.streams[0].task_index
    assert cd.streams[2].train_episodes == cd.streams[0].train_episodes == data.streams[0].train_episodes
    assert cd.streams[2].heldout_episodes == cd.streams[0].heldout_episodes


def test_task_filtered_dataset_item_i_is_ith_frame_of_its_task(base, data, frames) -> None:
    ep_map = data.episode_task_map
    for k in (0, 7):
        task = data.streams[k].task_index
        ds = TaskFilteredDataset(base, [task], ep_map)
        expected = _global_indices(frames, ep_map[task])
        assert len(ds) == len(expected) == 24
        np.testing.assert_array_equal(ds.frame_indices, expected)
        got = [int(ds[i]["index"]) for i in range(len(ds))]
        assert got == expected.tolist()
        assert int(ds[-1]["index"]) == expected[-1]
        assert ds.meta is base.meta
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_train_split_views_only_its_episodes(data, frames) -> None:
    stream = data.streams[2]
    ds = data.train_dataset(2)
    expected = _global_indices(frames, stream.train_episodes)
    assert [int(ds[i]["index"]) for i in range(len(ds))] == expected.tolist()
    assert {int(ds[i]["episode_index"]) for i in range(len(ds))} == set(stream.train_episodes)


def test_action_windows_with_delta_timestamps(synthetic_libero, data, frames) -> None:
    root, repo_id, spec = synthetic_libero
    horizon = 5
    delta = {"action": [j / spec.fps for j in range(horizon)]}
    windowed = open_dataset(repo_id, root, delta_timestamps=delta)
    task = data.streams[1].task_index
    ds = TaskFilteredDataset(windowed, [task], data.episode_task_map)
    expected = _global_indices(frames, data.episode_task_map[task])
    episode_end = {
        int(e): int(frames["index"][frames["episode_index"] == e].max()) + 1
        for e in np.unique(frames["episode_index"])
    }
    n_pad = 0
    for i in range(len(ds)):
        item = ds[i]
        g = int(item["index"])
        assert g == expected[i]
        assert item["action"].shape == (horizon, 7)
        end = episode_end[int(item["episode_index"])]
        for j in range(horizon):
            past_end = g + j >= end
            assert bool(item["action_is_pad"][j]) == past_end, (i, j)
            if not past_end:
                np.testing.assert_allclose(
                    item["action"][j].numpy(), frames["action"][g + j], rtol=0, atol=1e-6
                )
        n_pad += int(item["action_is_pad"].sum())
    # 3 episodes x (1 + 2 + 3 + 4) padded steps at their ends.
    assert n_pad == 3 * sum(range(horizon))


def test_subset_base_dataset_maps_positions(synthetic_libero, data, frames) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root, repo_id, _ = synthetic_libero
    ep_map = data.episode_task_map
    task, other = data.streams[0].task_index, data.streams[5].task_index
    eps = ep_map[task]
    subset = [eps[2], ep_map[other][1], eps[0]]  # unsorted on purpose
    sub = LeRobotDataset(repo_id, root=root, episodes=subset)
    ranges = episode_frame_ranges(sub)
    assert sorted(ranges) == sorted(subset)
    assert sorted(ranges.values())[0][0] == 0 and max(r[1] for r in ranges.values()) == len(sub) == 24

    ds = TaskFilteredDataset(sub, [task], ep_map, episodes=subset)
    assert ds.episodes == sorted([eps[0], eps[2]])
    expected = _global_indices(frames, [eps[0], eps[2]])
    assert [int(ds[i]["index"]) for i in range(len(ds))] == expected.tolist()
    with pytest.raises(DataError, match="not loaded"):
        TaskFilteredDataset(sub, [task], ep_map)  # eps[1] is not in the subset


# ---- train / held-out split ------------------------------------------------------------------------


EP_MAP = {0: list(range(10)), 1: [10, 11, 12], 2: [20, 21, 22, 23, 24], 3: [30]}


def test_split_is_deterministic_disjoint_and_complete() -> None:
    a = split_episodes(EP_MAP, [0, 1, 2], 0.2, seed=3)
    b = split_episodes(EP_MAP, [0, 1, 2], 0.2, seed=3)
    assert a == b
    for task, (train, held) in a.items():
        assert set(train).isdisjoint(held)
        assert sorted(train + held) == EP_MAP[task]
        assert len(held) == math.ceil(0.2 * len(EP_MAP[task]))
        assert train == sorted(train) and held == sorted(held)
    # A task's split does not depend on which other tasks are in the sequence.
    assert split_episodes(EP_MAP, [2, 0], 0.2, seed=3)[0] == a[0]
    assert split_episodes(EP_MAP, [0], 0.0)[0] == (EP_MAP[0], [])
    # Different seeds give different held-out sets for some task.
    others = [split_episodes(EP_MAP, [0], 0.2, seed=s)[0][1] for s in range(5)]
    assert len({tuple(h) for h in others}) > 1


def test_split_task_without_episodes() -> None:
    with pytest.raises(DataError, match=r"Task 'turn on the stove' \(task_index 5\) has no episodes"):
        split_episodes(EP_MAP, [0, 5], 0.2, task_names=["a", "turn on the stove"])


def test_split_leaves_no_training_episode() -> None:
    with pytest.raises(DataError) as info:
        split_episodes(EP_MAP, [1, 3], 0.2, task_names=["three", "only one"])
    msg = str(info.value)
    assert "'only one'" in msg and "heldout_fraction=0.2" in msg and "no training episode" in msg
    assert msg.count(". ") == 0 and "\n" not in msg


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_fraction_outside_range(fraction: float) -> None:
    with pytest.raises(ConfigError, match=rf"heldout_fraction={fraction} .*\[0, 1\)"):
        split_episodes(EP_MAP, [0], fraction)


# ---- normalization statistics ------------------------------------------------------------------------


def _numpy_stats(frames: dict[str, np.ndarray], episodes) -> dict[str, dict[str, np.ndarray]]:
    mask = np.isin(frames["episode_index"], list(episodes))
    out = {}
    for key in ("observation.state", "action"):
        x = frames[key][mask].astype(np.float64)
        out[key] = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0)}
    return out


def _assert_stats_close(got, want) -> None:
    # atol 1e-4: pooling float32 per-episode stats gives a constant column a std of ~3e-5, not 0.
    for key, stats in want.items():
        for stat, value in stats.items():
            np.testing.assert_allclose(
                np.asarray(got[key][stat], dtype=np.float64).reshape(-1),
                value,
                rtol=1e-5,
                atol=1e-4,
                err_msg=f"{key}/{stat}",
            )


def test_select_stats_choices(base, data, frames) -> None:
    per_task = [s.train_episodes for s in data.streams]
    first = select_stats("first_task", base.meta, per_task, current_task=4)
    _assert_stats_close(first, _numpy_stats(frames, data.streams[0].train_episodes))
    assert set(first) >= {"observation.state", "action", "observation.images.image"}

    seen = select_stats(NormalizationChoice.SEEN_TASKS, base.meta, per_task, current_task=2)
    _assert_stats_close(seen, _numpy_stats(frames, [e for s in data.streams[:3] for e in s.train_episodes]))
    seen0 = select_stats("seen_tasks", base.meta, per_task, current_task=0)
    _assert_stats_close(seen0, _numpy_stats(frames, data.streams[0].train_episodes))

    whole = select_stats("dataset", base.meta, per_task, current_task=0)
    _assert_stats_close(whole, _numpy_stats(frames, range(30)))
    assert not np.allclose(whole["action"]["mean"], first["action"]["mean"])

    with pytest.raises(ConfigError, match=r"data\.normalization='per_task' is not allowed"):
        select_stats("per_task", base.meta, per_task, current_task=0)
    with pytest.raises(DataError, match="zero episodes"):
        aggregate_episode_stats(base.meta, [])


def test_save_dataset_statistics_writes_json(data, frames, tmp_path) -> None:
    ds = data.train_dataset(0)
    path = ds.save_dataset_statistics(tmp_path / "stats" / "task0.json")
    assert Path(path).is_file()
    saved = json.loads(Path(path).read_text())
    _assert_stats_close(saved, _numpy_stats(frames, data.streams[0].train_episodes))


# ---- the synthetic writer ----------------------------------------------------------------------------


def test_synthetic_writer_reuses_and_never_overwrites_foreign_data(synthetic_libero, tmp_path) -> None:
    root, repo_id, spec = synthetic_libero
    marker = root / SETTINGS_FILE
    stamp = marker.stat().st_mtime_ns
    assert write_synthetic_dataset(root, repo_id, spec) == root
    assert marker.stat().st_mtime_ns == stamp  # same settings: reused, not rewritten

    foreign = tmp_path / "real_dataset"
    (foreign / "meta").mkdir(parents=True)
    (foreign / "meta" / "info.json").write_text("{}")
    with pytest.raises(DataError, match="not written by cl_vla's synthetic writer"):
        write_synthetic_dataset(foreign, "x/y", SyntheticSpec(instructions=("a",), episodes_per_task=1))
    assert (foreign / "meta" / "info.json").read_text() == "{}"
    assert not (foreign / SETTINGS_FILE).exists()
