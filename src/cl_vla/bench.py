"""Speed and memory benchmark: ``make bench`` (``python -m cl_vla.bench --steps 100``).

Trains the same model (``--model``, tiny_vla by default) on the same synthetic LIBERO-schema data
(two 64x64 cameras) through a two-task sequence with each algorithm (every ``conf/algorithm`` choice by
default) and prints, for the second task (where every algorithm is active): steady-state training
steps/s, its ratio to ``sequential``, the algorithm's extra memory (its checkpointed state), and for
replay methods the bytes per stored sample next to the bytes of one decoded sample (what a buffer of
frames would hold).

Steady state: steps are timed between consecutive ``after_backward`` calls (a whole optimizer step,
the algorithm's gradient edits included), skipping the first ones of the task, so the start-up of a
``fit`` (dataloader workers, caches) does not decide short runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def _decoded_bytes(dataset) -> int:
    item = dataset[0]
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


def _stamp_steps(stamps: list[float]):
    """An ``algorithm_hook`` that records the time of every ``after_backward`` call."""

    def hook(algorithm) -> None:
        inner = algorithm.after_backward

        def after_backward(*args, **kwargs):
            stamps.append(time.perf_counter())
            return inner(*args, **kwargs)

        algorithm.after_backward = after_backward

    return hook


def steady_steps_per_s(stamps: list[float], steps: int) -> float:
    """Steps/s over the last task's ``steps`` stamps, its first fifth (at most 20) left out."""
    last = stamps[-steps:]
    skip = min(20, max(1, steps // 5))
    if len(last) - skip < 2:
        raise ValueError(f"--steps must be at least {skip + 2} to time a steady state, got {steps}.")
    return (len(last) - skip - 1) / (last[-1] - last[skip])


def run_one(algo: str, steps: int, batch: int, workers: int, out: Path, extra: list[str]) -> dict:
    from cl_vla.data.task_sequences import get_task_sequence
    from cl_vla.training.in_process import run_in_process, sequence_overrides

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
    stamps: list[float] = []
    res, algorithm, data = run_in_process(overrides, out / algo, algorithm_hook=_stamp_steps(stamps))
    stored = len(algorithm) if hasattr(algorithm, "__len__") else 0
    return {
        "steps_per_s": steady_steps_per_s(stamps, steps),
        "state_bytes": res["extra"]["algorithm_state_bytes"],
        "stored": stored,
        "decoded_bytes": _decoded_bytes(data.train_dataset(0)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per task")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--algorithms", default="all", help="comma-separated conf/algorithm choices, or 'all'")
    p.add_argument("--model", default="tiny_vla", help="a conf/model choice, e.g. smolvla_tiny")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cl_vla.paths import conf_dir

    known = sorted(q.stem for q in (conf_dir() / "algorithm").glob("*.yaml"))
    algos = (
        ["sequential", *(a for a in known if a != "sequential")]
        if args.algorithms == "all"
        else args.algorithms.split(",")
    )
    unknown = [a for a in algos if a not in known]
    if unknown:
        p.error(f"unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'all'.")
    # Logs and CI have no terminal width; keep the table on one line per algorithm there.
    console = Console(width=None if sys.stdout.isatty() else 140)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cl_vla_bench_") as tmp:
        for algo in algos:
            console.print(f"[bold]bench[/]: {algo} ({args.steps} steps/task, batch {args.batch})")
            extra = [f"model={args.model}", *args.overrides]
            rows[algo] = run_one(algo, args.steps, args.batch, args.workers, Path(tmp), extra)
    threads = torch.get_num_threads()
    title = f"task-2 steady-state training speed, {args.model}, batch {args.batch}, {threads} threads"
    header, cells = bench_rows(rows)
    t = Table(title=title)
    for c in header:
        t.add_column(c, justify="right")
    for row in cells:
        t.add_row(*row)
    console.print(t)
    if args.markdown is not None:
        lines = [f"{title}, {args.steps} steps/task", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        args.markdown.write_text("\n".join(lines) + "\n")


def bench_rows(rows: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The table's header and cells: speeds as ratios to ``sequential`` (else the first algorithm)."""
    base = rows.get("sequential", next(iter(rows.values())))["steps_per_s"]
    decoded = next(iter(rows.values()))["decoded_bytes"]
    header = [
        "algorithm",
        "steps/s",
        "ratio to sequential",
        "extra memory",
        "stored samples",
        f"bytes/stored sample (decoded: {decoded:,})",
    ]
    cells = []
    for algo, r in rows.items():
        per = r["state_bytes"] / r["stored"] if r["stored"] else None
        cells.append(
            [
                algo,
                f"{r['steps_per_s']:.2f}",
                f"{r['steps_per_s'] / base:.3f}",
                _size(r["state_bytes"]),
                str(r["stored"]) if r["stored"] else "-",
                f"{per:.1f}" if per else "-",
            ]
        )
    return header, cells


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


if __name__ == "__main__":
    main()
