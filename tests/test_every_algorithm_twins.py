"""Every algorithm with the tiny twins of the hub VLAs (lerobot's SmolVLA, pi0, pi0.5 and GR00T classes
and processors, random weights): every hook reached, exact resume mid-task and at the task boundary.

The checks are ``test_every_algorithm.py``'s; this file only lists the (model, algorithm) pairs, so
pytest-xdist (``--dist loadfile``) runs it beside the tiny_vla cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from test_every_algorithm import TWIN_CASES, check_hooks_and_resume

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("model", "algo"), TWIN_CASES, ids=[f"{m}-{a}" for m, a in TWIN_CASES])
def test_twin_hooks_are_reached_and_resume_is_exact(model, algo, synthetic_libero, tmp_path: Path):
    check_hooks_and_resume(model, algo, synthetic_libero, tmp_path)
