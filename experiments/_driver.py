"""What the long experiment drivers (the headline table, its tuning) share before they start runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def offline_python() -> str:
    """Set the offline, one-thread defaults every run inherits and return the interpreter to run
    ``train.py`` with: ``$PYTHON``, else the project's ``.venv``, else this one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    venv = REPO / ".venv" / "bin" / "python"
    return os.environ.get("PYTHON") or (str(venv) if venv.exists() else sys.executable)
