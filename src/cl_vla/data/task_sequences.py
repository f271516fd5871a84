"""Task sequences, per-task episode maps, and the per-task view of a LeRobot dataset.

A task sequence is an ordered list of tasks, each named by its language instruction (or by a task
index of the dataset). Sequences live one YAML each in ``conf/task_sequence/``; this module reads the
same files, so ``get_task_sequence("libero_spatial")`` and ``task_sequence=libero_spatial`` agree.

Tasks are resolved against the dataset's own ``meta.tasks`` (instruction -> task_index), never by
assuming that the dataset numbers its tasks in the sequence's order.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from cl_vla.errors import ConfigError, DataError, one_of
from cl_vla.paths import conf_dir

TaskRef = str | int


@dataclass(frozen=True)
class TaskSequence:
    """An ordered list of tasks; ``env_tasks`` names the simulator task of each (when there is one)."""

    name: str
    tasks: tuple[TaskRef, ...]
    suite: str | None = None
    env_tasks: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError(
                f"Task sequence {self.name!r} has no tasks; give at least one instruction or index."
            )
        for t in self.tasks:
            if not isinstance(t, str | int) or isinstance(t, bool) or (isinstance(t, str) and not t.strip()):
                raise ConfigError(
                    f"Task {t!r} of sequence {self.name!r} is not allowed; a task is an instruction string "
                    "or a task index."
                )
        if self.env_tasks is not None and len(self.env_tasks) != len(self.tasks):
            raise ConfigError(
                f"Sequence {self.name!r} has {len(self.tasks)} tasks but {len(self.env_tasks)} env_tasks; "
                "they must pair one to one."
            )

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[TaskRef]:
        return iter(self.tasks)

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any], default_name: str = "custom") -> TaskSequence:
        tasks = node.get("tasks")
        if not isinstance(tasks, Sequence) or isinstance(tasks, str):
            raise ConfigError(
                f"Task sequence {node.get('name', default_name)!r} needs 'tasks': a list of instructions "
                "or task indices."
            )
        env = node.get("env_tasks")
        return cls(
            name=str(node.get("name") or default_name),
            tasks=tuple(tasks),
            suite=node.get("suite"),
            env_tasks=tuple(env) if env else None,
            aliases=tuple(node.get("aliases") or ()),
            description=str(node.get("description") or ""),
        )


@cache
def _registry() -> dict[str, TaskSequence]:
    reg: dict[str, TaskSequence] = {}
    for path in sorted((conf_dir() / "task_sequence").glob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        if not isinstance(node.get("tasks"), list) or node.get("datasets"):
            # templates (custom.yaml: `tasks: ???`), aliases built by a defaults list, and sequences
            # across datasets (their tasks are mappings: cl_vla.data.multi_source)
            continue
        seq = TaskSequence.from_mapping(node, default_name=path.stem)
        for key in (seq.name, *seq.aliases):
            reg[key] = seq
    return reg


def list_task_sequences() -> list[str]:
    """Names (not aliases) of the sequences shipped in ``conf/task_sequence/``."""
    return sorted({s.name for s in _registry().values()})


def get_task_sequence(name: str) -> TaskSequence:
    """Retrieve a CL task sequence by name (or alias, e.g. ``libero_long`` for ``libero_10``)."""
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"Unknown task sequence {name!r}; choose one of {one_of(sorted(reg))}.")
    return reg[name]


# ---- resolving tasks against a dataset ----------------------------------------------------------


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def dataset_tasks(meta: Any) -> dict[str, int]:
    """``instruction -> task_index`` from a dataset's ``meta.tasks``; fails if it has none."""
    tasks = getattr(meta, "tasks", None)
    if tasks is None or len(tasks) == 0:
        raise DataError(
            f"Dataset {getattr(meta, 'repo_id', '?')!r} has no task information (meta/tasks.parquet is "
            "empty); cl_vla needs one language instruction per episode to split it into tasks."
        )
    return {str(k): int(v) for k, v in tasks["task_index"].items()}


def resolve_task_indices(sequence: TaskSequence, meta: Any) -> list[int]:
    """The dataset's task_index of every task of ``sequence``, in the sequence's order."""
    by_text = dataset_tasks(meta)
    by_norm = {_normalize(k): v for k, v in by_text.items()}
    valid = set(by_text.values())
    out = []
    for t in sequence.tasks:
        if isinstance(t, int):
            if t not in valid:
                raise DataError(
                    f"Task index {t} of sequence {sequence.name!r} is not in dataset "
                    f"{getattr(meta, 'repo_id', '?')!r}; its task indices are {min(valid)}..{max(valid)}."
                )
            out.append(t)
            continue
        idx = by_text.get(t, by_norm.get(_normalize(t)))
        if idx is None:
            close = difflib.get_close_matches(t, list(by_text), n=1, cutoff=0.6)
            hint = f" (closest: {close[0]!r})" if close else ""
            raise DataError(
                f"Instruction {t!r} of sequence {sequence.name!r} is not a task of dataset "
                f"{getattr(meta, 'repo_id', '?')!r}{hint}."
            )
        out.append(idx)
    return out


def _episodes_table(meta: Any) -> list[dict[str, Any]]:
    eps = getattr(meta, "episodes", None)
    if eps is None:
        raise DataError(f"Dataset {getattr(meta, 'repo_id', '?')!r} has no episode metadata (meta/episodes).")
    cols = ["episode_index", "tasks", "length", "dataset_from_index", "dataset_to_index"]
    missing = [c for c in cols if c not in eps.column_names]
    if missing:
        raise DataError(
            f"Dataset {getattr(meta, 'repo_id', '?')!r} lacks episode columns {missing}; "
            "it must be in LeRobot's v3.0 format."
        )
    return eps.select_columns(cols).to_list()


def build_episode_task_map(dataset: Any) -> dict[int, list[int]]:
    """Map task_index -> sorted episode indices, read from ``meta.episodes`` (no parquet scan).

    ``dataset`` is a ``LeRobotDataset`` or its ``LeRobotDatasetMetadata``. An episode annotated with
    several tasks is listed under each of them.
    """
    meta = getattr(dataset, "meta", dataset)
    by_text = dataset_tasks(meta)
    out: dict[int, list[int]] = {}
    for row in _episodes_table(meta):
        for text in row["tasks"] or []:
            if text not in by_text:
                raise DataError(
                    f"Episode {row['episode_index']} names task {text!r}, absent from meta.tasks."
                )
            out.setdefault(by_text[text], []).append(int(row["episode_index"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def episode_frame_ranges(dataset: Any) -> dict[int, tuple[int, int]]:
    """``episode -> (start, stop)`` positions of its frames in ``dataset`` (as ``dataset[i]`` indexes).

    A LeRobotDataset opened on a subset of episodes indexes its frames by position in that subset,
    not by the global ``index``; this accounts for that. Several datasets behind one index space
    (:class:`cl_vla.data.multi_source.MultiSourceDataset`) answer for themselves.
    """
    own = getattr(dataset, "episode_frame_ranges", None)
    if callable(own):
        return own()
    rows = _episodes_table(dataset.meta)
    selected = getattr(dataset, "episodes", None)
    if selected is None:
        return {
            int(r["episode_index"]): (int(r["dataset_from_index"]), int(r["dataset_to_index"])) for r in rows
        }
    keep = set(int(e) for e in selected)
    out, pos = {}, 0
    for r in sorted(rows, key=lambda r: r["episode_index"]):
        if int(r["episode_index"]) in keep:
            n = int(r["dataset_to_index"]) - int(r["dataset_from_index"])
            out[int(r["episode_index"])] = (pos, pos + n)
            pos += n
    return out


class TaskFilteredDataset(Dataset):
    """The frames of some tasks (optionally some of their episodes) of a LeRobot dataset, copying nothing.

    ``self[i]`` is ``base_dataset[frame_indices[i]]``: the i-th frame of the selected episodes in
    episode order, so ``delta_timestamps`` windows, video decoding and transforms of the base dataset
    apply unchanged. ``frame_indices`` are what replay buffers store as references.
    """

    def __init__(
        self,
        base_dataset: Any,
        task_indices: Sequence[int],
        episode_task_map: Mapping[int, Sequence[int]],
        episodes: Sequence[int] | None = None,
    ) -> None:
        self.base_dataset = base_dataset
        self.task_indices = [int(t) for t in task_indices]
        wanted = sorted({e for t in self.task_indices for e in episode_task_map.get(t, ())})
        if episodes is not None:
            allowed = set(int(e) for e in episodes)
            wanted = [e for e in wanted if e in allowed]
        ranges = episode_frame_ranges(base_dataset)
        absent = [e for e in wanted if e not in ranges]
        if absent:
            raise DataError(
                f"Episodes {absent[:5]} are not loaded in the base dataset; open it on all episodes."
            )
        self.episodes = wanted
        self.frame_indices = (
            np.concatenate([np.arange(*ranges[e], dtype=np.int64) for e in wanted])
            if wanted
            else np.zeros(0, dtype=np.int64)
        )

    def __len__(self) -> int:
        return len(self.frame_indices)

    def __getitem__(self, idx: int) -> dict:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} frames")
        return self.base_dataset[int(self.frame_indices[idx])]

    @property
    def meta(self) -> Any:
        return self.base_dataset.meta

    def save_dataset_statistics(self, path: str | Path) -> Path:
        """Write the normalization statistics of exactly these episodes to ``path`` (JSON)."""
        from cl_vla.data.stats import aggregate_episode_stats, stats_to_jsonable

        stats = aggregate_episode_stats(self.base_dataset.meta, self.episodes)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats_to_jsonable(stats), indent=1))
        return path


@dataclass
class TaskStream:
    """One task of a resolved sequence: its dataset task index and its train / held-out episodes."""

    position: int
    name: str
    task_index: int
    train_episodes: list[int]
    heldout_episodes: list[int]
    num_train_frames: int = 0
    num_heldout_frames: int = 0
    env_task: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
