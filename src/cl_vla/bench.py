"""Speed and memory benchmark: ``make bench`` (``python -m cl_vla.bench --steps 100``).

Trains the same tiny_vla on the same synthetic LIBERO-schema data (two 64x64 cameras) through a
two-task sequence with each algorithm and prints, for the second task (where replay is active):
training steps/s, the ratio to ``sequential``, the algorithm's extra memory, and for experience
replay the bytes per stored sample next to the bytes of one decoded sample (what a buffer of frames
would hold).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def _decoded_bytes(dataset) -> int:
    item = dataset[0]
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


def run_in_process(overrides: list[str], out_dir: Path, algorithm_hook=None) -> tuple[dict, object, object]:
    """Compose ``conf/`` with ``overrides``, train in this process into ``out_dir``.

    Returns ``(results, algorithm, data)``; ``results`` is what :func:`cl_vla.reporting.read_results`
    reads back from ``out_dir``.
    """
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import build_algorithm, prepare_data, validate_config
    from cl_vla.config import register_configs
    from cl_vla.loop import run_continual
    from cl_vla.paths import conf_dir
    from cl_vla.reporting import read_results

    register_configs()
    out_dir.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"output_dir={out_dir}"])
    cfg = validate_config(cfg)
    algorithm = build_algorithm(cfg.algorithm)
    if algorithm_hook is not None:
        algorithm_hook(algorithm)
    data, policy_cfg = prepare_data(cfg)
    run_continual(cfg, data, policy_cfg, algorithm, console=Console(quiet=True))
    return read_results(out_dir), algorithm, data


def sequence_overrides(name: str, tasks: list[str]) -> list[str]:
    return [
        "task_sequence=custom",
        f"task_sequence.name={name}",
        "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
    ]


def run_one(algo: str, steps: int, batch: int, workers: int, out: Path, extra: list[str]) -> dict:
    from cl_vla.data.task_sequences import get_task_sequence

    tasks = list(get_task_sequence("libero_spatial").tasks[:2])
    overrides = [
        f"algorithm={algo}",
        *sequence_overrides("bench2", tasks),
        f"continual_learning.steps_per_task={steps}",
        f"data.batch_size={batch}",
        f"data.num_workers={workers}",
        "eval.max_batches=1",
        "logger=none",
        "trainer.progress_bar=false",
        *extra,
    ]
    res, algorithm, data = run_in_process(overrides, out / algo)
    stored = len(algorithm) if hasattr(algorithm, "__len__") else 0
    return {
        "steps_per_s": steps / res["extra"]["train_seconds"][1],
        "state_bytes": res["extra"]["algorithm_state_bytes"],
        "stored": stored,
        "decoded_bytes": _decoded_bytes(data.train_dataset(0)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per task")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--algorithms", default="sequential,er", help="comma-separated conf/algorithm choices")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cl_vla_bench_") as tmp:
        for algo in args.algorithms.split(","):
            console.print(f"[bold]bench[/]: {algo} ({args.steps} steps/task, batch {args.batch})")
            rows[algo] = run_one(algo, args.steps, args.batch, args.workers, Path(tmp), args.overrides)
    base = rows.get("sequential", next(iter(rows.values())))["steps_per_s"]
    t = Table(title=f"task-2 training speed, tiny_vla, batch {args.batch}, {torch.get_num_threads()} threads")
    for c in (
        "algorithm",
        "steps/s",
        "ratio to sequential",
        "extra memory",
        "stored samples",
        "bytes/sample",
    ):
        t.add_column(c, justify="right")
    for algo, r in rows.items():
        per = r["state_bytes"] / r["stored"] if r["stored"] else None
        t.add_row(
            algo,
            f"{r['steps_per_s']:.2f}",
            f"{r['steps_per_s'] / base:.3f}",
            f"{r['state_bytes'] / 1024:.1f} KiB",
            str(r["stored"]),
            f"{per:.1f} (a decoded sample: {r['decoded_bytes']:,})" if per else "-",
        )
    console.print(t)


if __name__ == "__main__":
    main()
