"""From a data config and a task sequence to per-task train / held-out streams of one LeRobot dataset."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cl_vla.data.splits import split_episodes
from cl_vla.data.task_sequences import (
    TaskFilteredDataset,
    TaskSequence,
    TaskStream,
    build_episode_task_map,
    episode_frame_ranges,
    resolve_task_indices,
)
from cl_vla.errors import DataError


def ensure_synthetic(data_cfg: Any, sequence: TaskSequence, *, progress: bool = True) -> None:
    """Write the synthetic dataset ``data_cfg`` asks for, for the sequence's instructions (cached)."""
    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset

    syn = data_cfg.synthetic
    instructions = list(dict.fromkeys(t for t in sequence.tasks if isinstance(t, str)))
    if len(instructions) != len(set(sequence.tasks)):
        raise DataError(
            f"A synthetic dataset is written from instructions, but sequence {sequence.name!r} names "
            "tasks by index; use instruction strings or a real dataset (data.root)."
        )
    # The `data.synthetic` schema (cl_vla.config.schema.SyntheticDataConfig) has exactly the spec's settings.
    settings = OmegaConf.to_container(syn, resolve=True) if isinstance(syn, DictConfig) else dict(syn)
    spec = SyntheticSpec(instructions=tuple(instructions), **settings)
    write_synthetic_dataset(data_cfg.root, data_cfg.repo_id, spec, progress=progress)


class UnconvertedDatasetError(DataError):
    """A LeRobot dataset older than codebase v3.0, which lerobot 0.6.1 refuses."""


#: lerobot's own converter of v2.1 datasets (lerobot/scripts/convert_dataset_v21_to_v30.py in 0.6.1).
V21_CONVERTER = "lerobot.scripts.convert_dataset_v21_to_v30"


def unconverted_message(what: str, version: str, repo_id: str | None = None, root: Path | None = None) -> str:
    """One sentence for a dataset lerobot 0.6.1 cannot read (v2.1 and older; IPEC's LIBERO sets are v2.1)."""
    folder = str(root) if root is not None else "<a local copy>"
    return (
        f"{what} is a LeRobot {version} dataset, but lerobot 0.6.1 reads codebase v3.0 only; convert a local "
        f"copy first with lerobot's converter (python -m {V21_CONVERTER} --repo-id={repo_id or '<repo id>'} "
        f"--root={folder} --push-to-hub=false, in place) and read that folder."
    )


def check_dataset_layout(root: Path, repo_id: str | None = None) -> None:
    """Name what a local LeRobot v3 dataset lacks before lerobot sees it: with a local root, lerobot
    answers a missing metadata file by trying the hub, and offline its message never names the file."""
    import json

    if not (root / "meta" / "info.json").is_file():
        what = "does not exist" if not root.exists() else "has no meta/info.json"
        raise DataError(
            f"No LeRobot dataset at data.root={str(root)!r} (the folder {what}); "
            "point data.root at a dataset directory or use data=synthetic."
        )
    try:
        version = str(json.loads((root / "meta" / "info.json").read_text()).get("codebase_version", "?"))
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"data.root={str(root)!r}: meta/info.json is not valid JSON ({e}).") from e
    if not version.startswith("v3"):
        raise UnconvertedDatasetError(
            unconverted_message(f"The dataset at {str(root)!r}", version, repo_id, root)
        )
    required = {
        "meta/tasks.parquet": (root / "meta" / "tasks.parquet").is_file(),
        "meta/episodes/ (episode parquet files)": any((root / "meta" / "episodes").glob("**/*.parquet")),
        "data/ (frame parquet files)": any((root / "data").glob("**/*.parquet")),
    }
    missing = [name for name, present in required.items() if not present]
    if missing:
        raise DataError(
            f"The LeRobot dataset at data.root={str(root)!r} is incomplete: {', '.join(missing)} "
            "missing (a v3.0 dataset holds meta/info.json, meta/tasks.parquet, meta/episodes/ and data/)."
        )


def damaged_parquet(root: Path) -> tuple[Path, str] | None:
    """The first parquet file of a local dataset that pyarrow cannot read whole, with why; None if all
    read. Only called once opening failed: lerobot and `datasets` then say "An error occurred while
    generating the dataset", naming neither the file nor the cause."""
    import pyarrow.parquet as pq

    for path in sorted([*root.glob("meta/**/*.parquet"), *root.glob("data/**/*.parquet")]):
        try:
            pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            return path, (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def open_dataset(
    repo_id: str,
    root: str | os.PathLike | None,
    delta_timestamps: Mapping[str, Sequence[float]] | None = None,
    video_backend: str | None = None,
):
    """Open a LeRobot dataset from ``root`` (a local copy) or from a hub by ``repo_id``."""
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()  # one "Map" bar per episode filter buries the run's own output

    if root is not None:
        root = Path(root).expanduser()
        check_dataset_layout(root, repo_id)
    try:
        return LeRobotDataset(
            repo_id,
            root=root,
            delta_timestamps=dict(delta_timestamps) if delta_timestamps else None,
            video_backend=video_backend,
        )
    except DataError:
        raise
    except Exception as e:  # lerobot raises many kinds; the user needs to know which dataset failed and why
        if type(e).__name__ == "BackwardCompatibilityError":  # a v2.1 dataset from the hub or its cache
            # lerobot 0.6.1 raises it only for v2.1 (older versions are a NotImplementedError).
            msg = unconverted_message(f"Dataset {repo_id!r}", "v2.1", repo_id=repo_id)
            raise UnconvertedDatasetError(msg) from e
        damaged = damaged_parquet(root) if root is not None else None
        if damaged is not None:
            path, why = damaged
            raise DataError(
                f"Dataset {repo_id!r} cannot be read: {str(path)!r} is truncated or damaged ({why}); "
                "restore that file from the original copy of the dataset."
            ) from e
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        if root is None and offline:
            raise DataError(
                f"Dataset {repo_id!r} is not on disk and the hub is off (HF_HUB_OFFLINE=1); give "
                "data.root=<local copy>."
            ) from e
        raise DataError(f"Could not open dataset {repo_id!r}: {type(e).__name__}: {e}".splitlines()[0]) from e


@dataclass
class ContinualData:
    """One dataset seen as the ordered tasks of a sequence, each split into train and held-out episodes."""

    dataset: Any
    sequence: TaskSequence
    streams: list[TaskStream]
    episode_task_map: dict[int, list[int]]

    def train_dataset(self, position: int) -> TaskFilteredDataset:
        s = self.streams[position]
        return TaskFilteredDataset(self.dataset, [s.task_index], self.episode_task_map, s.train_episodes)

    def heldout_dataset(self, position: int) -> TaskFilteredDataset:
        s = self.streams[position]
        return TaskFilteredDataset(self.dataset, [s.task_index], self.episode_task_map, s.heldout_episodes)

    @property
    def num_tasks(self) -> int:
        return len(self.streams)

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.streams]


def build_continual_data(
    dataset: Any, sequence: TaskSequence, heldout_fraction: float, split_seed: int = 0
) -> ContinualData:
    """Resolve the sequence against ``dataset.meta.tasks`` and split every task's episodes."""
    task_indices = resolve_task_indices(sequence, dataset.meta)
    ep_map = build_episode_task_map(dataset)
    names = [str(t) if isinstance(t, str) else _task_text(dataset.meta, t) for t in sequence.tasks]
    splits = split_episodes(ep_map, task_indices, heldout_fraction, split_seed, task_names=names)
    ranges = episode_frame_ranges(dataset)
    streams = []
    for pos, (task, name) in enumerate(zip(task_indices, names, strict=True)):
        train, held = splits[task]
        streams.append(
            TaskStream(
                position=pos,
                name=name,
                task_index=task,
                train_episodes=train,
                heldout_episodes=held,
                num_train_frames=sum(ranges[e][1] - ranges[e][0] for e in train),
                num_heldout_frames=sum(ranges[e][1] - ranges[e][0] for e in held),
                env_task=sequence.env_tasks[pos] if sequence.env_tasks else None,
            )
        )
    return ContinualData(dataset, sequence, streams, ep_map)


def _task_text(meta: Any, index: int) -> str:
    for text, idx in meta.tasks["task_index"].items():
        if int(idx) == index:
            return str(text)
    return f"task {index}"


def task_table(data: ContinualData):
    """A rich table: one row per task with its dataset index, episodes and frames."""
    from rich.table import Table

    multi = any("dataset" in s.extra for s in data.streams)  # a cross-dataset sequence: name each one's
    t = Table(title=f"{data.sequence.name}: {data.num_tasks} tasks from {data.dataset.repo_id}")
    for col, kw in [
        ("#", {"justify": "right"}),
        ("task", {"overflow": "fold", "max_width": 60}),
        *([("dataset", {})] if multi else []),
        ("task_index", {"justify": "right"}),
        ("train eps", {"justify": "right"}),
        ("held-out eps", {"justify": "right"}),
        ("train frames", {"justify": "right"}),
        ("held-out frames", {"justify": "right"}),
    ]:
        t.add_column(col, **kw)
    for s in data.streams:
        t.add_row(
            str(s.position),
            s.name,
            *([str(s.extra.get("dataset", ""))] if multi else []),
            str(s.task_index),
            str(len(s.train_episodes)),
            str(len(s.heldout_episodes)),
            str(s.num_train_frames),
            str(s.num_heldout_frames),
        )
    return t
