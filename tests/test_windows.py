"""The in-memory action/state windows give exactly what lerobot's delta_timestamps give."""

from __future__ import annotations

import torch

from cl_vla.data.streams import open_dataset
from cl_vla.data.task_sequences import TaskFilteredDataset, build_episode_task_map
from cl_vla.data.windows import WindowedDataset, split_deltas


def test_windows_match_lerobot_on_every_item(synthetic_libero):
    root, repo_id, spec = synthetic_libero
    fps = spec.fps
    delta = {"action": [i / fps for i in range(-2, 10)], "observation.state": [-1 / fps, 0.0]}
    ref = open_dataset(repo_id, root, delta)
    fast, slow = split_deltas({**delta, "observation.images.image": [0.0]}, ref.meta.features)
    assert set(fast) == {"action", "observation.state"} and set(slow) == {"observation.images.image"}
    win = WindowedDataset(open_dataset(repo_id, root, None), delta)
    assert len(win) == len(ref)
    for i in range(len(ref)):
        a, b = ref[i], win[i]
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b[k]), (i, k)
            else:
                assert v == b[k]


def test_windows_on_an_episode_subset_and_through_task_filter(synthetic_libero):
    root, repo_id, spec = synthetic_libero
    delta = {"action": [i / spec.fps for i in range(4)]}
    episodes = [1, 4, 7]
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ref = LeRobotDataset(repo_id, root=root, episodes=episodes, delta_timestamps=delta)
    win = WindowedDataset(LeRobotDataset(repo_id, root=root, episodes=episodes), delta)
    for i in range(len(ref)):
        assert torch.equal(ref[i]["action"], win[i]["action"])
        assert torch.equal(ref[i]["action_is_pad"], win[i]["action_is_pad"])
    ep_map = build_episode_task_map(win)
    task = next(t for t, eps in ep_map.items() if set(eps) & set(episodes))
    view = TaskFilteredDataset(win, [task], ep_map, episodes=episodes)
    assert len(view) > 0 and all(int(view[j]["episode_index"]) in episodes for j in range(len(view)))
