"""The experiments/ recipes: every job of each multirun composes and validates (no training), the sweep
goes to one directory and the report is called on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TEST_ENV


@pytest.mark.parametrize(
    ("recipe", "jobs"),
    [
        ("smoke_sweep.sh", 4),
        ("replay_ratio_metaworld.sh", 12),
        ("algorithm_comparison.sh", 27),
        ("replay_ratio_libero_spatial.sh", 12),
    ],
)
def test_recipe_jobs_compose_and_validate(recipe: str, jobs: int, tmp_path) -> None:
    python = tmp_path / "python"
    python.write_text(
        f'#!/usr/bin/env bash\nexec "{sys.executable}" "{REPO_ROOT / "tests" / "recipe_check.py"}" "$@"\n'
    )
    python.chmod(0o755)
    log, sweep_dir = tmp_path / "seen.json", tmp_path / "sweep"
    env = {
        **os.environ,
        **TEST_ENV,
        "PYTHON": str(python),
        "SWEEP_DIR": str(sweep_dir),
        "RECIPE_LOG": str(log),
    }
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "experiments" / recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(log.read_text())
    assert seen["jobs"] == jobs
    assert f"hydra.sweep.dir={sweep_dir}" in seen["overrides"]
    assert seen["report"][0] == str(sweep_dir)
