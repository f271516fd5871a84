"""The identity of a LeRobot dataset on disk, so a resume can tell a moved copy of its dataset from
another dataset: a digest of the dataset's ``meta/`` folder (info.json with its features and totals,
the tasks, every episode's metadata and statistics). A byte copy has the same identity; another dataset,
or the same folder rewritten with other settings, has another. Cheap: ``meta/`` holds no frames.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def dataset_identity(root: str | Path) -> str | None:
    """sha256 of ``root/meta`` (names and bytes of its files); None when ``root`` holds no dataset."""
    meta = Path(root).expanduser() / "meta"
    if not (meta / "info.json").is_file():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in meta.rglob("*") if p.is_file()):
        h.update(path.relative_to(meta).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()
