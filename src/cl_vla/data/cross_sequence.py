"""Cross-dataset task sequences as configured: which datasets, and which of their episodes each task is.

``task_sequence.datasets`` names the datasets (name -> ``repo_id`` / ``root`` / ``rename`` /
``synthetic``); each task is a mapping naming one of them and the instruction(s) selecting it there
(none: every episode), or a group of tasks (``tasks: [...]`` or ``sequence: <a shipped sequence>``).
Everything here is checked before any dataset is opened, one sentence per mistake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cl_vla.data.task_sequences import TaskRef, TaskSequence
from cl_vla.errors import ConfigError, one_of

FPS_RULES = ("same", "own_frames")
# repo_id: the dataset's id; root: a local copy; rename: its feature -> the policy's name (null: drop
# it); synthetic: data=synthetic writer settings over data.synthetic (+ `features`, names to write under);
# fps: the rate its frames were really taken at, where its info.json labels them otherwise
_DATASET_KEYS = {"repo_id", "root", "rename", "synthetic", "fps"}
_TASK_KEYS = {"dataset", "instruction", "instructions", "tasks", "sequence", "name", "env_task"}


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a cross-dataset sequence, as ``task_sequence.datasets.<name>`` gives it."""

    name: str
    repo_id: str
    root: str | None = None
    rename: Mapping[str, str | None] = field(default_factory=dict)
    synthetic: Mapping[str, Any] | None = None
    # The rate the frames were taken at, declared where info.json labels the same per-step frames otherwise
    # (LIBERO's sets: one frame per 20 Hz control step, labelled 10 fps in lerobot/libero and
    # HuggingFaceVLA/libero, 20 in lerobot/libero_*_image and IPEC's); fps_rule=same compares this.
    fps: float | None = None

    def frame_rate(self, labelled: float) -> float:
        """The rate fps_rule=same compares: the declared one, else what the dataset's info.json says."""
        return float(self.fps) if self.fps is not None else float(labelled)


@dataclass(frozen=True)
class SourceTask:
    """One task of the sequence: a dataset, and the instructions selecting it (none: every episode)."""

    dataset: str
    select: tuple[TaskRef, ...]
    name: str
    env_task: str | None = None


@dataclass(frozen=True)
class CrossSequence:
    name: str
    sources: tuple[SourceSpec, ...]
    tasks: tuple[SourceTask, ...]
    image_size: tuple[int, int] | None = None
    fps_rule: str = "same"

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.sources if s.name == name)

    def as_task_sequence(self, suite: str | None = None) -> TaskSequence:
        env = [t.env_task for t in self.tasks]
        return TaskSequence(
            name=self.name,
            tasks=tuple(t.name for t in self.tasks),
            suite=suite,
            env_tasks=tuple(env) if all(e is not None for e in env) else None,
        )


def is_cross_dataset(seq_node: Mapping[str, Any]) -> bool:
    """Whether a ``task_sequence`` node names its datasets (otherwise one dataset: ``data.*``)."""
    return bool(seq_node.get("datasets"))


def parse_cross_sequence(node: Mapping[str, Any]) -> CrossSequence:
    """Read a ``task_sequence`` node with ``datasets``; one sentence per mistake."""
    name = str(node.get("name") or "custom")
    sources = []
    for key, src in dict(node["datasets"]).items():
        src = dict(src or {})
        unknown = set(src) - _DATASET_KEYS
        if unknown:
            raise ConfigError(
                f"task_sequence.datasets.{key} has key(s) {sorted(unknown)}; allowed: "
                f"{', '.join(sorted(_DATASET_KEYS))}."
            )
        if not src.get("repo_id"):
            raise ConfigError(f"task_sequence.datasets.{key} has no repo_id; give the dataset's repo id.")
        fps = src.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0):
            raise ConfigError(
                f"task_sequence.datasets.{key}.fps={fps!r} is not allowed; give the positive rate its frames "
                "were taken at, or leave it out to use its info.json's fps."
            )
        sources.append(
            SourceSpec(
                name=str(key),
                repo_id=str(src["repo_id"]),
                root=src.get("root"),
                rename=dict(src.get("rename") or {}),
                synthetic=src.get("synthetic"),
                fps=None if fps is None else float(fps),
            )
        )
    known = [s.name for s in sources]
    tasks: list[SourceTask] = []
    for i, entry in enumerate(node.get("tasks") or []):
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"Task {i} ({entry!r}) of sequence {name!r} names no dataset; with task_sequence.datasets "
                "set, every task is a mapping {dataset: <name>, instruction: ...}."
            )
        ds = entry.get("dataset")
        if ds not in known:
            raise ConfigError(
                f"Task {i} of sequence {name!r} names dataset={ds!r}; choose {one_of(known)} "
                "(the keys of task_sequence.datasets)."
            )
        unknown = set(entry) - _TASK_KEYS
        if unknown:
            raise ConfigError(
                f"Task {i} of sequence {name!r} has key(s) {sorted(unknown)}; allowed: dataset, instruction, "
                "instructions, tasks or sequence (a group), name, env_task."
            )
        if "sequence" in entry:  # a group: the tasks of a shipped sequence (conf/task_sequence/<name>)
            from cl_vla.data.task_sequences import get_task_sequence

            shipped = get_task_sequence(str(entry["sequence"]))
            env = entry.get("env_task") or shipped.env_tasks
            entry = {**entry, "tasks": list(shipped.tasks), "env_task": env}
        if "tasks" in entry:  # a group: one task per instruction, all from the same dataset
            envs = entry.get("env_task") or [None] * len(entry["tasks"])
            for ref, env in zip(entry["tasks"], envs, strict=True):
                tasks.append(SourceTask(ds, (ref,), str(ref), env))
            continue
        select = entry.get("instructions", [entry["instruction"]] if "instruction" in entry else [])
        label = entry.get("name") or (str(select[0]) if len(select) == 1 else ds if not select else None)
        tasks.append(
            SourceTask(ds, tuple(select), str(label or " | ".join(map(str, select))), entry.get("env_task"))
        )
    if not tasks:
        raise ConfigError(f"Task sequence {name!r} has no tasks; give at least one.")
    env_tasks = node.get("env_tasks")
    if env_tasks:  # the simulator's task of each (expanded) task, as in a one-dataset sequence
        if len(env_tasks) != len(tasks):
            raise ConfigError(
                f"Sequence {name!r} has {len(tasks)} tasks but {len(env_tasks)} env_tasks; they must pair "
                "one to one."
            )
        pairs = zip(tasks, env_tasks, strict=True)
        tasks = [SourceTask(t.dataset, t.select, t.name, t.env_task or e) for t, e in pairs]
    rule = str(node.get("fps_rule") or "same")
    if rule not in FPS_RULES:
        raise ConfigError(
            f"task_sequence.fps_rule={rule!r} is not allowed; choose {one_of(list(FPS_RULES))}."
        )
    size = node.get("image_size")
    if size is not None and (len(size) != 2 or min(int(v) for v in size) < 1):
        raise ConfigError(f"task_sequence.image_size={list(size)} is not allowed; give [height, width].")
    return CrossSequence(
        name, tuple(sources), tuple(tasks), tuple(int(v) for v in size) if size else None, rule
    )
