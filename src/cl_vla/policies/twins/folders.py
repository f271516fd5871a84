"""Generated twin folders live in the cl_vla cache, one per content, written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cl_vla.paths import cache_dir

#: Bumped when the generated content changes for the same spec.
FORMAT = 1


def twin_folder(kind: str, spec: Mapping[str, Any], write: Callable[[Path], None]) -> Path:
    """``<cache>/twins/<kind>_<hash of spec>``, written by ``write(tmp)`` on first use.

    Keyed by content, so differently sized twins never share a folder, and written into a temporary
    sibling then renamed, so a concurrent or interrupted writer never leaves half a folder behind.
    """
    key = json.dumps({"format": FORMAT, **spec}, sort_keys=True)
    folder = cache_dir() / "twins" / f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "config.json").is_file() or (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        (tmp / "cl_vla_twin_spec.json").write_text(key)
        with contextlib.suppress(OSError):  # another process won the race; its folder is identical
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
