"""Fast ``delta_timestamps`` windows for low-dimensional features (actions, states).

lerobot answers a windowed item by querying its Arrow table once per key, about 5 ms per item here:
with a batch of 32 action chunks that alone caps training at a few steps/s on a CPU. The columns of
non-visual features are small (an action is 7 floats), so this wrapper keeps them in memory as
arrays and cuts the windows itself, with lerobot's exact semantics: indices clamped to the
episode's frames and ``<key>_is_pad`` set where the window leaves the episode. Visual features
with windows keep lerobot's own path (the dataset is then opened with those deltas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cl_vla.data.task_sequences import episode_frame_ranges


def split_deltas(
    delta_timestamps: Mapping[str, Sequence[float]] | None, features: Mapping[str, Any]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``(in_memory, lerobot)``: windows this module can serve, and the ones left to lerobot."""
    fast, slow = {}, {}
    for key, deltas in (delta_timestamps or {}).items():
        dtype = features.get(key, {}).get("dtype")
        (slow if dtype in ("image", "video") else fast)[key] = list(deltas)
    return fast, slow


class WindowedDataset(torch.utils.data.Dataset):
    """``base[i]`` with the windows of ``delta_timestamps`` (non-visual keys) added from memory."""

    def __init__(self, base: Any, delta_timestamps: Mapping[str, Sequence[float]]) -> None:
        self.base = base
        fps = base.meta.fps
        self.deltas = {
            k: np.array([round(d * fps) for d in v], dtype=np.int64) for k, v in delta_timestamps.items()
        }
        table = base.hf_dataset.with_format(None).data
        self.columns = {k: np.stack(table.column(k).to_numpy(zero_copy_only=False)) for k in self.deltas}
        ranges = episode_frame_ranges(base)
        episodes = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
        self.ep_start = np.array([ranges[int(e)][0] for e in episodes], dtype=np.int64)
        self.ep_end = np.array([ranges[int(e)][1] for e in episodes], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> dict:
        item = self.base[idx]
        start, end = self.ep_start[idx], self.ep_end[idx]
        for key, d in self.deltas.items():
            q = idx + d
            item[key] = torch.from_numpy(self.columns[key][np.clip(q, start, end - 1)])
            item[f"{key}_is_pad"] = torch.from_numpy((q < start) | (q >= end))
        return item

    def __getattr__(self, name: str) -> Any:
        # meta, episodes, repo_id, hf_dataset...: the wrapped LeRobotDataset's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)
