"""A committed record of the finished runs of long experiments (``docs/results/ledger/<name>.jsonl``).

The headline table and its tuning take longer than one machine lives here (runs of ~10 min on 2 cores,
dozens of them), and run directories (``multirun/``) are not committed. A finished run's summary (its
algorithm settings, metrics, R matrix, wall time, the commit it ran on) goes into the ledger, which is
committed, so the next invocation, on this machine or another, skips it and still tables it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LEDGER_DIR = REPO / "docs" / "results" / "ledger"


def read(name: str) -> list[dict[str, Any]]:
    """Every entry of the ledger ``name`` (oldest first); none when it does not exist yet."""
    path = LEDGER_DIR / f"{name}.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append(name: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` with the date, the core count and the commit checked out when it is recorded (the
    run's own unless the tree moved while it ran)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    full = {**entry, "commit": commit or None, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    LEDGER_DIR.mkdir(parents=True, exist_ok=True)
    with open(LEDGER_DIR / f"{name}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(full, sort_keys=True) + "\n")


def run_summary(run_dir: Path) -> dict[str, Any] | None:
    """What the ledger keeps of a finished run directory (None while it has no complete results.json):
    its algorithm settings as resolved, metrics, R matrix and wall seconds (start to results)."""
    from omegaconf import OmegaConf

    res, started = run_dir / "results.json", run_dir / "run.json"
    if not res.is_file():
        return None
    results = json.loads(res.read_text(encoding="utf-8"))
    m = results["metrics"]
    if m.get("tasks_learned", m.get("num_tasks")) != m.get("num_tasks"):
        return None
    resolved = OmegaConf.load(run_dir / "config.resolved.yaml")
    seconds = res.stat().st_mtime - started.stat().st_mtime if started.is_file() else None
    return {
        "algorithm": str(resolved.algorithm.get("name", run_dir.name)),
        "settings": OmegaConf.to_container(resolved.algorithm),
        "seed": int(resolved.seed),
        "metrics": m,
        "matrix": results["matrix"],
        "seconds": None if seconds is None else round(seconds, 1),
    }


def differing(settings: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """The keys of ``expected`` whose value ``settings`` does not have."""
    return sorted(k for k, v in expected.items() if settings.get(k) != v)
