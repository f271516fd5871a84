"""Task sequences across datasets: each task names the LeRobot dataset it comes from.

A cross-dataset sequence lists its datasets under ``task_sequence.datasets`` (name -> ``repo_id`` /
``root`` / ``rename``) and names one per task::

    datasets:
      pick:  {repo_id: me/so101_pick_cube}
      stack: {repo_id: me/so101_stack, rename: {observation.images.top: observation.images.front}}
    tasks:
      - {dataset: pick}                                     # every episode of the dataset
      - {dataset: stack, instruction: stack the red cube}   # the episodes of one instruction
      - {dataset: stack, tasks: [a, b]}                     # a group: one task per instruction
      - {dataset: spatial, sequence: libero_spatial}        # a group: a shipped sequence's tasks

The datasets are aligned to one feature space (the first dataset's, after renaming; cameras resized
to one size) and concatenated behind one index space: global index = offset of its dataset + local
index. Streams, replay references (one int64 each), the batch sampler, resume and DDP therefore see
one dataset, exactly as with a single LeRobot dataset; nothing is copied. Episodes and tasks get
global numbers the same way, so per-episode statistics and held-out splits work unchanged.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cl_vla.data.task_sequences import TaskRef, TaskSequence, TaskStream, build_episode_task_map
from cl_vla.errors import ConfigError, DataError, one_of

# Keys every LeRobot frame carries; renumbered into the global spaces, never renamed.
INDEX_KEYS = ("index", "episode_index", "task_index", "frame_index", "timestamp")
FPS_RULES = ("same", "own_frames")
# repo_id: the dataset's id; root: a local copy; rename: its feature -> the policy's name (null: drop
# it); synthetic: data=synthetic writer settings over data.synthetic (+ `features`, names to write under)
_DATASET_KEYS = {"repo_id", "root", "rename", "synthetic"}
_TASK_KEYS = {"dataset", "instruction", "instructions", "tasks", "sequence", "name", "env_task"}


@dataclass(frozen=True)
class SourceSpec:
    """One dataset of a cross-dataset sequence, as ``task_sequence.datasets.<name>`` gives it."""

    name: str
    repo_id: str
    root: str | None = None
    rename: Mapping[str, str | None] = field(default_factory=dict)
    synthetic: Mapping[str, Any] | None = None


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
        sources.append(
            SourceSpec(
                name=str(key),
                repo_id=str(src["repo_id"]),
                root=src.get("root"),
                rename=dict(src.get("rename") or {}),
                synthetic=src.get("synthetic"),
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


# ---- one feature space ---------------------------------------------------------------------------


def _is_visual(feature: Mapping[str, Any]) -> bool:
    return feature.get("dtype") in ("image", "video")


def _hw(feature: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of an image feature, whatever order its shape is stored in."""
    shape, names = list(feature["shape"]), list(feature.get("names") or [])
    if "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    return (int(shape[1]), int(shape[2])) if shape[0] in (1, 3) else (int(shape[0]), int(shape[1]))


def renamed_features(meta: Any, spec: SourceSpec) -> dict[str, dict]:
    """The dataset's non-index features under the policy's names (features renamed to null dropped)."""
    bad = [k for k in spec.rename if k not in meta.features]
    if bad:
        raise DataError(
            f"task_sequence.datasets.{spec.name}.rename names {bad[0]!r}, which dataset {spec.repo_id!r} "
            f"does not have; its features are {sorted(k for k in meta.features if k not in INDEX_KEYS)}."
        )
    out = {}
    for key, feat in meta.features.items():
        if key in INDEX_KEYS:
            continue
        new = spec.rename.get(key, key)
        if new is not None:
            out[new] = dict(feat)
    return out


def feature_space(
    metas: Sequence[Any], specs: Sequence[SourceSpec], image_size: tuple[int, int] | None, fps_rule: str
) -> dict[str, dict]:
    """The features every batch carries: the first dataset's (renamed, cameras at one size).

    Every other dataset must provide each of them with the same shape (images: any size, resized) and,
    where both datasets name the entries of a vector, the same names (the same meaning); otherwise one
    sentence names the dataset and the feature.
    """
    first = renamed_features(metas[0], specs[0])
    cams = [k for k, f in first.items() if _is_visual(f)]
    size = image_size or (_hw(first[cams[0]]) if cams else None)
    space = {}
    for key, feat in first.items():
        if _is_visual(feat):
            space[key] = {**feat, "shape": (*size, 3), "names": ["height", "width", "channels"]}
        else:
            space[key] = feat
    for meta, spec in zip(metas, specs, strict=True):
        if fps_rule == "same" and meta.fps != metas[0].fps:
            raise DataError(
                f"Dataset {spec.name!r} ({spec.repo_id}) records at {meta.fps} fps but {specs[0].name!r} at "
                f"{metas[0].fps} fps; set task_sequence.fps_rule=own_frames (windows of the same number of "
                "frames, each at its dataset's rate) or use datasets of one fps."
            )
        feats = renamed_features(meta, spec)
        for key, want in space.items():
            have = feats.get(key)
            if have is None:
                raise DataError(
                    f"Dataset {spec.name!r} ({spec.repo_id}) has no feature {key!r}, which "
                    f"{specs[0].name!r} has; map one of its features to it with "
                    f"task_sequence.datasets.{spec.name}.rename, or drop it from {specs[0].name!r} "
                    f"(rename it to null); its features are {sorted(feats)}."
                )
            if _is_visual(want) != _is_visual(have):
                raise DataError(
                    f"Dataset {spec.name!r} ({spec.repo_id}) has {key!r} as {have.get('dtype')} but "
                    f"{specs[0].name!r} as {want.get('dtype')}; they cannot be aligned."
                )
            if _is_visual(want):
                continue
            if tuple(have["shape"]) != tuple(want["shape"]):
                raise DataError(
                    f"Dataset {spec.name!r} ({spec.repo_id}) has {key!r} of shape {list(have['shape'])} but "
                    f"{specs[0].name!r} of shape {list(want['shape'])}; a policy has one {key} width, so "
                    "these datasets cannot share a sequence."
                )
            a, b = _names(have), _names(want)
            if a is not None and b is not None and a != b:
                raise DataError(
                    f"Dataset {spec.name!r} ({spec.repo_id}) names the entries of {key!r} {a} but "
                    f"{specs[0].name!r} names them {b}: a different meaning, so they cannot be aligned."
                )
    return space


def _names(feature: Mapping[str, Any]) -> list[str] | None:
    names = feature.get("names")
    if isinstance(names, Mapping):  # {"motors": [...]}: older LeRobot conversions
        names = next(iter(names.values()), None)
    return [str(n) for n in names] if isinstance(names, list) else None


# ---- the concatenated dataset ----------------------------------------------------------------------


class AlignedSource(Dataset):
    """One dataset's frames in the sequence's feature space: renamed, cameras resized, extras dropped."""

    def __init__(self, dataset: Any, spec: SourceSpec, space: Mapping[str, dict]) -> None:
        self.dataset, self.spec = dataset, spec
        self.keys = {k: spec.rename.get(k, k) for k in dataset.meta.features if k not in INDEX_KEYS}
        self.keys = {k: v for k, v in self.keys.items() if v in space}
        self.sizes = {v: tuple(space[v]["shape"][:2]) for v in self.keys.values() if _is_visual(space[v])}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        item = self.dataset[idx]
        out = {k: item[k] for k in INDEX_KEYS if k in item}
        out["task"] = item.get("task")
        for key, new in self.keys.items():
            value = item[key]
            if new in self.sizes and tuple(value.shape[-2:]) != self.sizes[new]:
                value = _resize(value, self.sizes[new])
            out[new] = value
            if f"{key}_is_pad" in item:
                out[f"{new}_is_pad"] = item[f"{key}_is_pad"]
        return out


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Frames come as float (C, H, W) or, with windows, (T, C, H, W); antialias as torchvision does.
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    out = torch.nn.functional.interpolate(
        batch, size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return out if image.dim() == 4 else out.squeeze(0)


class CombinedMeta:
    """What the policy factory, the statistics and the task table read of a dataset, for the concatenation.

    ``stats`` pools the datasets' stored statistics (lerobot's ``aggregate_stats``: exact means and
    stds, min/max over all); :meth:`global_episode_stats` answers for a global episode from its dataset's
    stored per-episode statistics, so ``first_task`` / ``seen_tasks`` read no frame either.
    """

    def __init__(
        self, metas: Sequence[Any], specs: Sequence[SourceSpec], space: dict, ep_offsets: Sequence[int]
    ):
        from lerobot.datasets.compute_stats import aggregate_stats

        self.metas, self.specs, self.ep_offsets = list(metas), list(specs), list(ep_offsets)
        self.repo_id = " + ".join(s.repo_id for s in specs)
        self.fps = metas[0].fps
        index_feats = {k: v for k, v in metas[0].features.items() if k in INDEX_KEYS}
        self.features = {**space, **index_feats}
        self.camera_keys = [k for k, f in space.items() if _is_visual(f)]
        self.stats = aggregate_stats([self._renamed(m.stats, s) for m, s in zip(metas, specs, strict=True)])

    def _renamed(self, stats: Mapping[str, Mapping[str, Any]], spec: SourceSpec) -> dict:
        out = {}
        for key, d in stats.items():
            new = spec.rename.get(key, key)
            if new in self.features and key not in INDEX_KEYS:
                out[new] = {s: np.asarray(v) for s, v in d.items()}
        return out

    def locate_episode(self, episode: int) -> tuple[int, int]:
        """``(dataset position, local episode)`` of a global episode number."""
        pos = bisect.bisect_right(self.ep_offsets, int(episode)) - 1
        return pos, int(episode) - self.ep_offsets[pos]

    def global_episode_stats(self, episode: int) -> dict:
        from cl_vla.data.stats import episode_stats

        pos, local = self.locate_episode(episode)
        return self._renamed(episode_stats(self.metas[pos], local), self.specs[pos])


class MultiSourceDataset(Dataset):
    """Aligned datasets behind one index space: ``self[offset[k] + i] = dataset_k[i]``.

    ``index``, ``episode_index`` and ``task_index`` of an item are its global numbers, so a frame is
    identified by one integer everywhere (replay buffers, samplers, checkpoints).
    """

    def __init__(
        self, sources: Sequence[AlignedSource], meta: CombinedMeta, task_offsets: Sequence[int]
    ) -> None:
        self.sources = list(sources)
        self.meta = meta
        self.repo_id = meta.repo_id
        self.offsets = np.cumsum([0, *(len(s) for s in self.sources)]).tolist()
        self.task_offsets = list(task_offsets)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, idx: int) -> tuple[int, int]:
        """``(dataset position, local index)`` of a global index."""
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} frames")
        pos = bisect.bisect_right(self.offsets, idx) - 1
        return pos, idx - self.offsets[pos]

    def __getitem__(self, idx: int) -> dict:
        pos, local = self.locate(int(idx))
        item = self.sources[pos][local]
        item["index"] = torch.tensor(int(idx))
        if "episode_index" in item:
            item["episode_index"] = item["episode_index"] + self.meta.ep_offsets[pos]
        if "task_index" in item:
            item["task_index"] = item["task_index"] + self.task_offsets[pos]
        return item

    def episode_frame_ranges(self) -> dict[int, tuple[int, int]]:
        """Global episode -> (start, stop) global indices (read by ``episode_frame_ranges``)."""
        from cl_vla.data.task_sequences import episode_frame_ranges

        out = {}
        for pos, src in enumerate(self.sources):
            for ep, (a, b) in episode_frame_ranges(src.dataset).items():
                out[ep + self.meta.ep_offsets[pos]] = (a + self.offsets[pos], b + self.offsets[pos])
        return out


# ---- from config to ContinualData ------------------------------------------------------------------


def ensure_synthetic_sources(data_cfg: Any, seq: CrossSequence) -> dict[str, tuple[str, str]]:
    """data=synthetic: write a stand-in dataset per source (cached); returns name -> (root, repo_id).

    Every stand-in holds every instruction of the sequence (a data mix), so the synthetic tasks of
    different datasets still demand different actions; a task selects its instruction inside its
    dataset as with real data.
    """
    import datasets
    from omegaconf import OmegaConf

    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from cl_vla.data.synthetic_variants import write_renamed_copy

    instructions = [str(r) for t in seq.tasks for r in t.select if isinstance(r, str)]
    if any(not t.select or any(not isinstance(r, str) for r in t.select) for t in seq.tasks):
        raise DataError(
            f"data=synthetic writes a dataset per instruction, but sequence {seq.name!r} selects a task by "
            "index or by its whole dataset; name each task's instruction, or read real data (data=local)."
        )
    datasets.disable_progress_bars()  # lerobot's writer shows one "Map" bar per episode otherwise
    base = data_cfg.synthetic
    base = OmegaConf.to_container(base, resolve=True) if OmegaConf.is_config(base) else dict(base)
    out = {}
    for src in seq.sources:
        own = dict(src.synthetic or {})
        features = own.pop("features", None) or {}
        spec = SyntheticSpec(instructions=tuple(dict.fromkeys(instructions)), **{**base, **own})
        root = Path(src.root or f"{data_cfg.root}__{src.name}").expanduser()
        if features:
            libero_root = root.with_name(root.name + ".libero_schema")
            write_synthetic_dataset(libero_root, src.repo_id + "_libero_schema", spec)
            write_renamed_copy(libero_root, root, src.repo_id, dict(features))
        else:
            write_synthetic_dataset(root, src.repo_id, spec)
        out[src.name] = (str(root), src.repo_id)
    return out


def open_source(spec: SourceSpec, root: str | None, delta_timestamps=None, video_backend=None):
    """Open one dataset of the sequence; a failure names the dataset and what to give."""
    import os

    from cl_vla.data.streams import open_dataset

    try:
        return open_dataset(spec.repo_id, root, delta_timestamps, video_backend)
    except DataError as e:
        if root is None and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise DataError(
                f"Dataset {spec.name!r} ({spec.repo_id}) of the task sequence is not on disk and the hub is "
                f"off (HF_HUB_OFFLINE=1); give task_sequence.datasets.{spec.name}.root=<local copy>."
            ) from e
        raise DataError(f"Dataset {spec.name!r} of the task sequence: {e}") from e


def prepare_cross_data(cfg: Any, device: str):
    """``cli.prepare_data`` for a sequence naming its datasets: returns ``(ContinualData, policy_cfg)``."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from omegaconf import OmegaConf

    from cl_vla.data.windows import WindowedDataset, split_deltas
    from cl_vla.models import build_policy_config

    node = OmegaConf.to_container(cfg.task_sequence, resolve=True)
    seq = parse_cross_sequence(node)
    roots = {s.name: (s.root, s.repo_id) for s in seq.sources}
    if cfg.data.source == "synthetic" and cfg.data.synthetic is not None:
        roots = ensure_synthetic_sources(cfg.data, seq)
    specs = [
        SourceSpec(s.name, roots[s.name][1], roots[s.name][0], s.rename, s.synthetic) for s in seq.sources
    ]
    plain = [open_source(s, s.root, None, cfg.data.video_backend) for s in specs]
    metas = [d.meta for d in plain]
    space = feature_space(metas, specs, seq.image_size, seq.fps_rule)
    ep_offsets = np.cumsum([0, *(m.total_episodes for m in metas)]).tolist()[:-1]
    meta = CombinedMeta(metas, specs, space, ep_offsets)
    policy_cfg = build_policy_config(OmegaConf.to_container(cfg.model, resolve=True), meta, device)

    sources = []
    for spec, ds in zip(specs, plain, strict=True):
        # Windows in policy-feature space at this dataset's own fps, then back to its own names.
        back = {new: old for old, new in spec.rename.items() if new is not None}
        proxy = _MetaView({back.get(k, k): f for k, f in meta.features.items()}, ds.meta.fps)
        deltas = resolve_delta_timestamps(policy_cfg, _MetaView(meta.features, ds.meta.fps))
        deltas = {back.get(k, k): v for k, v in (deltas or {}).items()}
        in_memory, visual = split_deltas(deltas, proxy.features)
        if visual:
            ds = open_source(spec, spec.root, visual, cfg.data.video_backend)
        if in_memory:
            ds = WindowedDataset(ds, in_memory)
        sources.append(AlignedSource(ds, spec, space))
    task_offsets = np.cumsum([0, *(len(m.tasks) for m in metas)]).tolist()[:-1]
    dataset = MultiSourceDataset(sources, meta, task_offsets)
    return build_cross_continual_data(
        dataset, seq, node.get("suite"), cfg.data.heldout_fraction, cfg.data.split_seed
    ), policy_cfg


@dataclass
class _MetaView:
    features: dict
    fps: float


def build_cross_continual_data(
    dataset: MultiSourceDataset,
    seq: CrossSequence,
    suite: str | None,
    heldout_fraction: float,
    split_seed: int,
):
    """Resolve each task inside its dataset, number tasks and episodes globally, split by episode."""
    from cl_vla.data.splits import split_episodes
    from cl_vla.data.streams import ContinualData
    from cl_vla.data.task_sequences import resolve_task_indices

    names = [s.name for s in seq.sources]
    ranges = dataset.episode_frame_ranges()
    ep_maps = [build_episode_task_map(src.dataset) for src in dataset.sources]
    episode_map: dict[int, list[int]] = {}
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    per_task: list[tuple[int, int]] = []  # (global task id, dataset position)
    for t in seq.tasks:
        pos = names.index(t.dataset)
        meta = dataset.sources[pos].dataset.meta
        local = (
            tuple(sorted(set(resolve_task_indices(TaskSequence(seq.name, t.select), meta))))
            if t.select
            else tuple(sorted(ep_maps[pos]))
        )
        key = (pos, local)
        if key not in ids:  # a task revisited later keeps its id, hence its split
            gid = ids[key] = len(ids)
            eps = sorted({e + dataset.meta.ep_offsets[pos] for lt in local for e in ep_maps[pos].get(lt, ())})
            episode_map[gid] = eps
        per_task.append((ids[key], pos))
    splits = split_episodes(
        episode_map,
        [g for g, _ in per_task],
        heldout_fraction,
        split_seed,
        task_names=[t.name for t in seq.tasks],
    )
    streams = []
    for position, (t, (gid, pos)) in enumerate(zip(seq.tasks, per_task, strict=True)):
        train, held = splits[gid]
        streams.append(
            TaskStream(
                position=position,
                name=t.name,
                task_index=gid,
                train_episodes=train,
                heldout_episodes=held,
                num_train_frames=sum(ranges[e][1] - ranges[e][0] for e in train),
                num_heldout_frames=sum(ranges[e][1] - ranges[e][0] for e in held),
                env_task=t.env_task,
                extra={"dataset": names[pos]},
            )
        )
    return ContinualData(dataset, seq.as_task_sequence(suite), streams, episode_map)
