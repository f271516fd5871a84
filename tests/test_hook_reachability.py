"""Every hook of every shipped algorithm is reached in a short real run, through the loop alone."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from conftest import CONF_DIR

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
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import build_algorithm, prepare_data, validate_config
    from cl_vla.config import register_configs
    from cl_vla.data.task_sequences import get_task_sequence
    from cl_vla.loop import run_continual

    root, repo_id, _ = synthetic_libero
    tasks = list(get_task_sequence("libero_spatial").tasks[:2])
    register_configs()
    overrides = [
        f"algorithm={algo}",
        "task_sequence=custom",
        "task_sequence.name=hooks2",
        "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
        f"data.root={root}",
        f"data.repo_id={repo_id}",
        "data.synthetic=null",
        "data.num_workers=0",
        "data.batch_size=4",
        "model.image_size=16",
        "continual_learning.steps_per_task=3",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.progress_bar=false",
        "logger=none",
        f"output_dir={tmp_path}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg = validate_config(cfg)
    algorithm = build_algorithm(cfg.algorithm)
    calls: Counter = Counter()
    _instrument(algorithm, calls)
    data, policy_cfg = prepare_data(cfg)
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
