"""Run what ``train.py`` runs inside this process: for the bench, experiment scripts and tests, which
need the algorithm object afterwards or cannot afford an interpreter start-up per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console


def compose_run(overrides: list[str], out_dir: Path) -> tuple[Any, Any, Any, Any]:
    """Compose ``conf/`` with ``overrides`` (output into ``out_dir``) as ``train.py`` would.

    Returns ``(cfg, algorithm, data, policy_cfg)``, ready for :func:`cl_vla.training.loop.run_continual`.
    """
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import build_algorithm, prepare_data, validate_config
    from cl_vla.config.schema import register_configs
    from cl_vla.paths import conf_dir

    register_configs()
    out_dir.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"output_dir={out_dir}"])
    cfg = validate_config(cfg)
    algorithm = build_algorithm(cfg.algorithm)
    data, policy_cfg = prepare_data(cfg)
    return cfg, algorithm, data, policy_cfg


def run_in_process(
    overrides: list[str], out_dir: Path, algorithm_hook=None, console: Console | None = None
) -> tuple[dict, object, object]:
    """Compose ``conf/`` with ``overrides``, train in this process into ``out_dir``.

    Returns ``(results, algorithm, data)``; ``results`` is what :func:`cl_vla.results.run_files.read_results`
    reads back from the run's directory (``out_dir``, or the resumed run's with ``resume=...``). What
    ``train.py`` would print goes to ``console`` (by default nowhere).
    """
    from cl_vla.results.run_files import read_results
    from cl_vla.training.loop import run_continual
    from cl_vla.training.run_dir import run_dir_of

    cfg, algorithm, data, policy_cfg = compose_run(overrides, out_dir)
    if algorithm_hook is not None:
        algorithm_hook(algorithm)
    run_continual(cfg, data, policy_cfg, algorithm, console=console or Console(quiet=True))
    run_dir = run_dir_of(cfg.resume) if cfg.resume else out_dir
    return read_results(run_dir), algorithm, data


def sequence_overrides(name: str, tasks: list[str]) -> list[str]:
    return [
        "task_sequence=custom",
        f"task_sequence.name={name}",
        "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
    ]
