"""Stand-ins for datasets of other schemas: a LeRobot dataset copied under other feature names.

Cross-dataset sequences must be tested on datasets that disagree in names and image sizes, as real
ones do. Instead of a second synthetic generator, a dataset written by :mod:`cl_vla.data.synthetic`
is re-recorded frame by frame with its features renamed (images keep their content), so both
datasets hold the same kind of demonstrations in different schemas.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cl_vla.errors import DataError

MARKER = "cl_vla_renamed_copy.json"
_INDEX_KEYS = ("index", "episode_index", "task_index", "frame_index", "timestamp")


def write_renamed_copy(
    src_root: str | Path, dst_root: str | Path, repo_id: str, rename: Mapping[str, str]
) -> Path:
    """Copy the LeRobot dataset at ``src_root`` to ``dst_root`` with features renamed (cached)."""
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()  # one "Map" bar per saved episode otherwise
    src_root, dst_root = Path(src_root), Path(dst_root)
    src_marker = json.loads((src_root / "cl_vla_synthetic.json").read_text())
    settings = {"source": src_marker.get("fingerprint"), "rename": dict(sorted(rename.items()))}
    marker = dst_root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return dst_root
    if dst_root.exists() and not marker.is_file():
        raise DataError(
            f"{str(dst_root)!r} holds files not written by cl_vla, so it is not overwritten; "
            "choose another root."
        )
    src = LeRobotDataset(repo_id + "_source", root=src_root)
    bad = [k for k in rename if k not in src.meta.features]
    if bad:
        raise DataError(f"Cannot rename {bad[0]!r}: the synthetic dataset has {sorted(src.meta.features)}.")
    features = {rename.get(k, k): dict(f) for k, f in src.meta.features.items() if k not in _INDEX_KEYS}
    tmp = dst_root.with_name(dst_root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out = LeRobotDataset.create(repo_id, fps=src.meta.fps, features=features, root=tmp, use_videos=False)
    episode = None
    for i in range(len(src)):
        item = src[i]
        if episode is not None and int(item["episode_index"]) != episode:
            out.save_episode()
        episode = int(item["episode_index"])
        frame = {"task": item["task"]}
        for key in features:
            old = next((k for k, v in rename.items() if v == key), key)
            value = item[old].numpy()
            if src.meta.features[old]["dtype"] in ("image", "video"):  # float CHW in [0, 1] -> uint8 HWC
                value = np.round(value.transpose(1, 2, 0) * 255).astype(np.uint8)
            frame[key] = value
        out.add_frame(frame)
    out.save_episode()
    out.finalize()
    (tmp / MARKER).write_text(json.dumps(settings))
    shutil.rmtree(dst_root, ignore_errors=True)
    tmp.rename(dst_root)
    return dst_root
