"""Every hook of every shipped algorithm is reached in a short real run, through the loop alone."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import CONF_DIR, in_process_overrides

pytestmark = pytest.mark.slow

HOOKS = (
    "setup",
    "on_task_start",
    "training_tasks",
    "replay_indices",
    "penalty",
    "after_backward",
    "observe",
    "on_task_end",
    "eval_context",
    "state_dict",
)
ALGORITHMS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))


def _instrument(algorithm, calls: Counter) -> None:
    for name in HOOKS:
        method = getattr(algorithm, name)

        @functools.wraps(method)
        def record(*args, _name=name, _method=method, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(algorithm, name, record)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_hook_is_reached(algo, synthetic_libero, tmp_path: Path):
    from cl_vla.bench import compose_run
    from cl_vla.loop import run_continual

    root, repo_id, _ = synthetic_libero
    overrides = [
        *in_process_overrides(algo, root, repo_id, "hooks2", steps=3),
        "trainer.checkpoint_every_n_steps=2",
    ]
    cfg, algorithm, data, policy_cfg = compose_run(overrides, tmp_path)
    calls: Counter = Counter()
    _instrument(algorithm, calls)
    run_continual(cfg, data, policy_cfg, algorithm, console=Console(quiet=True))

    # replay_indices is asked only of algorithms that replay (replay_batch_ratio > 0).
    expected = [h for h in HOOKS if h != "replay_indices" or algorithm.replay_batch_ratio > 0]
    missing = [h for h in expected if calls[h] == 0]
    assert not missing, f"{algo}: hooks never reached: {missing}"
    assert calls["on_task_start"] == calls["on_task_end"] == 2
    assert calls["observe"] == calls["after_backward"] == calls["penalty"] == 6
    assert calls["eval_context"] >= 2 * 2  # every task evaluated after every task
    from cl_vla.reporting import read_results

    R = read_results(tmp_path)["matrix"]
    assert R.shape == (2, 2) and np.isfinite(R).all()
