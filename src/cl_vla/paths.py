"""Where cl_vla finds its config tree and caches, without naming any machine's paths."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The Hydra config tree: ``$CL_VLA_CONF_DIR``, else the repository's ``conf/`` (editable install)."""
    env = os.environ.get("CL_VLA_CONF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [_PACKAGE_DIR / "conf", _PACKAGE_DIR.parents[1] / "conf"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise FileNotFoundError(
        "cl_vla's config tree was not found; set CL_VLA_CONF_DIR to the repository's conf/ directory."
    )


def cache_dir() -> Path:
    """Generated datasets and recordings: ``$CL_VLA_CACHE``, else ``~/.cache/cl_vla``."""
    return Path(os.environ.get("CL_VLA_CACHE", Path.home() / ".cache" / "cl_vla")).expanduser()
