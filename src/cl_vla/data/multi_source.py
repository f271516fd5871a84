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

The sequence's configuration is read in :mod:`cl_vla.data.cross_sequence`, the feature space decided
in :mod:`cl_vla.data.alignment`; this module concatenates the aligned datasets and builds the streams.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cl_vla.data.alignment import (
    INDEX_KEYS,
    AlignedSource,
    feature_space,
    is_visual,
    recorded_camera_size,
)
from cl_vla.data.cross_sequence import CrossSequence, SourceSpec, is_cross_dataset, parse_cross_sequence
from cl_vla.data.streams import ContinualData, UnconvertedDatasetError, open_dataset
from cl_vla.data.task_sequences import TaskSequence, TaskStream, build_episode_task_map
from cl_vla.errors import DataError

__all__ = [
    "CombinedMeta",
    "MultiSourceDataset",
    "is_cross_dataset",
    "parse_cross_sequence",
    "prepare_cross_data",
]


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
        self.camera_keys = [k for k, f in space.items() if is_visual(f)]
        # What LIBERO renders at evaluation: the size the policy's cameras were recorded at.
        self.recorded_camera_size = recorded_camera_size(metas, specs)
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


def open_source(
    spec: SourceSpec,
    root: str | None,
    delta_timestamps: Mapping[str, Sequence[float]] | None = None,
    video_backend: str | None = None,
) -> Any:
    """Open one dataset of the sequence; a failure names the dataset and what to give."""
    import os

    try:
        return open_dataset(spec.repo_id, root, delta_timestamps, video_backend)
    except DataError as e:
        # A v2.1 copy in the hub cache is on disk: its own message (convert it) is the one to give.
        if (
            root is None
            and os.environ.get("HF_HUB_OFFLINE") == "1"
            and not isinstance(e, UnconvertedDatasetError)
        ):
            raise DataError(
                f"Dataset {spec.name!r} ({spec.repo_id}) of the task sequence is not on disk and the hub is "
                f"off (HF_HUB_OFFLINE=1); give task_sequence.datasets.{spec.name}.root=<local copy>."
            ) from e
        raise DataError(f"Dataset {spec.name!r} of the task sequence: {e}") from e


def prepare_cross_data(cfg: Any, device: str) -> tuple[ContinualData, Any]:
    """``cli.prepare_data`` for a sequence naming its datasets: returns ``(ContinualData, policy_cfg)``."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from omegaconf import OmegaConf

    from cl_vla.data.windows import WindowedDataset, split_deltas
    from cl_vla.policies.configs import build_policy_config

    node = OmegaConf.to_container(cfg.task_sequence, resolve=True)
    seq = parse_cross_sequence(node)
    roots = {s.name: (s.root, s.repo_id) for s in seq.sources}
    if cfg.data.source == "synthetic" and cfg.data.synthetic is not None:
        roots = ensure_synthetic_sources(cfg.data, seq)
    specs = [
        SourceSpec(s.name, roots[s.name][1], roots[s.name][0], s.rename, s.synthetic, s.fps)
        for s in seq.sources
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
) -> ContinualData:
    """Resolve each task inside its dataset, number tasks and episodes globally, split by episode."""
    from cl_vla.data.splits import split_episodes
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
