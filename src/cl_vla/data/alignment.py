"""One feature space for several LeRobot datasets: renamed, cameras at one size, or one-sentence refusals.

The first dataset of a sequence (after its ``rename``) defines the features every batch carries; each
other dataset must provide them with the same vector widths and, where both name a vector's entries,
the same names (the same meaning). Cameras may differ in size: they are resized when read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cl_vla.data.cross_sequence import SourceSpec
from cl_vla.errors import DataError

# Keys every LeRobot frame carries; renumbered into the global spaces, never renamed.
INDEX_KEYS = ("index", "episode_index", "task_index", "frame_index", "timestamp")


def is_visual(feature: Mapping[str, Any]) -> bool:
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


def recorded_camera_size(metas: Sequence[Any], specs: Sequence[SourceSpec]) -> tuple[int, int] | None:
    """(height, width) the first dataset's first camera was recorded at (the policy's, before any resize)."""
    first = renamed_features(metas[0], specs[0])
    cams = [f for f in first.values() if is_visual(f)]
    return _hw(cams[0]) if cams else None


def feature_space(
    metas: Sequence[Any], specs: Sequence[SourceSpec], image_size: tuple[int, int] | None, fps_rule: str
) -> dict[str, dict]:
    """The features every batch carries: the first dataset's (renamed, cameras at one size).

    Every other dataset must provide each of them with the same shape (images: any size, resized) and,
    where both datasets name the entries of a vector, the same names (the same meaning); otherwise one
    sentence names the dataset and the feature.
    """
    first = renamed_features(metas[0], specs[0])
    cams = [k for k, f in first.items() if is_visual(f)]
    size = image_size or (_hw(first[cams[0]]) if cams else None)
    space = {}
    for key, feat in first.items():
        if is_visual(feat):
            space[key] = {**feat, "shape": (*size, 3), "names": ["height", "width", "channels"]}
        else:
            space[key] = feat
    # Windows are always cut in each dataset's own frames (its timestamps at its own fps label), so two
    # datasets whose frames are the same control steps align whatever fps they are labelled with.
    fps0 = specs[0].frame_rate(metas[0].fps)
    for meta, spec in zip(metas, specs, strict=True):
        if fps_rule == "same" and spec.frame_rate(meta.fps) != fps0:
            raise DataError(
                f"Dataset {spec.name!r} ({spec.repo_id}) records at {spec.frame_rate(meta.fps):g} fps but "
                f"{specs[0].name!r} at {fps0:g} fps; if their frames are the same control steps labelled "
                f"differently (LIBERO's sets: 10 or 20), declare the true rate with "
                f"task_sequence.datasets.<name>.fps, else set task_sequence.fps_rule=own_frames (windows of "
                "the same number of frames, each at its dataset's rate) or use datasets of one fps."
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
            if is_visual(want) != is_visual(have):
                raise DataError(
                    f"Dataset {spec.name!r} ({spec.repo_id}) has {key!r} as {have.get('dtype')} but "
                    f"{specs[0].name!r} as {want.get('dtype')}; they cannot be aligned."
                )
            if is_visual(want):
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


class AlignedSource(Dataset):
    """One dataset's frames in the sequence's feature space: renamed, cameras resized, extras dropped."""

    def __init__(self, dataset: Any, spec: SourceSpec, space: Mapping[str, dict]) -> None:
        self.dataset, self.spec = dataset, spec
        self.keys = {k: spec.rename.get(k, k) for k in dataset.meta.features if k not in INDEX_KEYS}
        self.keys = {k: v for k, v in self.keys.items() if v in space}
        self.sizes = {v: tuple(space[v]["shape"][:2]) for v in self.keys.values() if is_visual(space[v])}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        item = self.dataset[idx]
        out = {k: item[k] for k in INDEX_KEYS if k in item}
        out["task"] = item.get("task")
        for key, new in self.keys.items():
            value = item[key]
            if new in self.sizes and tuple(value.shape[-2:]) != self.sizes[new]:
                value = resize_image(value, self.sizes[new])
            out[new] = value
            if f"{key}_is_pad" in item:
                out[f"{new}_is_pad"] = item[f"{key}_is_pad"]
        return out


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A camera frame resized as training reads it (also LIBERO's evaluation, which must match).

    Frames come as float (C, H, W) or, with windows or a batch, (N, C, H, W); antialiased as torchvision.
    """
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    out = torch.nn.functional.interpolate(
        batch, size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return out if image.dim() == 4 else out.squeeze(0)
