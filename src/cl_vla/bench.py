"""Speed and memory benchmark: ``make bench`` (``python -m cl_vla.bench --steps 100``).

Trains the same model (``--model``, tiny_vla by default) on the same synthetic LIBERO-schema data
(two 64x64 cameras) through a two-task sequence with each algorithm (every ``conf/algorithm`` choice by
default) and prints, for the second task (where every algorithm is active): steady-state training
steps/s, the step time relative to ``sequential``, the *limit* of that ratio (``sequential``'s step
plus the inherent cost of the algorithm's extra work, timed in the same process right after the
``sequential`` run: :mod:`cl_vla.benchmarks.inherent`), measured / limit (near 1: the implementation
adds nothing beyond its method's work), the algorithm's extra memory (its checkpointed state), and for
replay methods the bytes per stored sample next to the bytes of one decoded sample.

Steady state: steps are timed between consecutive ``after_backward`` calls (a whole optimizer step,
the algorithm's gradient edits included), skipping the first ones of the task, so the start-up of a
``fit`` (dataloader workers, caches) does not decide short runs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

# Algorithms with a memory batch: the bench gives them the training batch size (one more
# forward/backward at equal batch), unless --memory-batch says otherwise.
_MEMORY_BATCH_ALGOS = ("agem", "gem")
#: measured / limit above this flags an implementation that costs more than its method's work.
WITHIN = 1.10


def _decoded_bytes(dataset) -> int:
    item = dataset[0]
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


def _stamp_steps(stamps: list[float], seen: dict[str, Any] | None = None):
    """An ``algorithm_hook`` that records the time of every ``after_backward`` call; with ``seen``, it
    also keeps the module the algorithm is set up with (``seen["module"]``)."""

    def hook(algorithm) -> None:
        inner = algorithm.after_backward

        def after_backward(*args, **kwargs):
            stamps.append(time.perf_counter())
            return inner(*args, **kwargs)

        algorithm.after_backward = after_backward
        if seen is not None:
            setup = algorithm.setup

            def keep_module(module, *args, **kwargs):
                seen["module"] = module
                return setup(module, *args, **kwargs)

            algorithm.setup = keep_module

    return hook


def steady_steps_per_s(stamps: list[float], steps: int) -> float:
    """Steps/s over the last task's ``steps`` stamps, its first fifth (at most 20) left out."""
    last = stamps[-steps:]
    skip = min(20, max(1, steps // 5))
    if len(last) - skip < 2:
        raise ValueError(f"--steps must be at least {skip + 2} to time a steady state, got {steps}.")
    return (len(last) - skip - 1) / (last[-1] - last[skip])


@dataclass
class BenchArgs:
    steps: int = 100
    batch: int = 32
    workers: int = 2
    model: str = "tiny_vla"
    memory_batch: int | None = None  # None: the training batch
    reps: int = 20  # rounds of the primitive timings
    rounds: int = 1  # runs of every algorithm, interleaved; ratios are from each one's best round
    threads: int | None = None  # torch threads the figures were measured with (None: this process's)
    overrides: list[str] = field(default_factory=list)


def _overrides(algo: str, args: BenchArgs) -> list[str]:
    from cl_vla.data.task_sequences import get_task_sequence
    from cl_vla.training.in_process import sequence_overrides

    tasks = list(get_task_sequence("libero_spatial").tasks[:2])
    out = [
        f"algorithm={algo}",
        *sequence_overrides("bench2", tasks),
        f"continual_learning.steps_per_task={args.steps}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        "eval.max_batches=1",
        "logger=none",
        "trainer.progress_bar=false",
        f"model={args.model}",
    ]
    if algo in _MEMORY_BATCH_ALGOS:
        out.append(f"algorithm.memory_batch_size={args.memory_batch or args.batch}")
    return [*out, *args.overrides]


def run_one(
    algo: str, args: BenchArgs, out: Path, primitives: bool = False, keep: dict | None = None
) -> dict:
    """Train ``algo`` through the two tasks; with ``primitives``, then time the inherent primitives
    on the trained policy (``row["primitives"]``: name -> median seconds; ``keep["primitives"]``: the
    :class:`~cl_vla.benchmarks.inherent.Primitives` they were timed with)."""
    from cl_vla.training.in_process import run_in_process

    stamps: list[float] = []
    seen: dict[str, Any] = {}
    res, algorithm, data = run_in_process(
        _overrides(algo, args), out / algo, algorithm_hook=_stamp_steps(stamps, seen)
    )
    stored = len(algorithm) if hasattr(algorithm, "__len__") else 0
    row = {
        "steps_per_s": steady_steps_per_s(stamps, args.steps),
        "state_bytes": res["extra"]["algorithm_state_bytes"],
        "stored": stored,
        "decoded_bytes": _decoded_bytes(data.train_dataset(0)),
    }
    if primitives and "module" in seen:
        row["primitives"], prims = time_primitives(seen["module"], data, args)
        if keep is not None:
            keep["primitives"] = prims
    return row


def time_primitives(module: Any, data: Any, args: BenchArgs) -> tuple[dict[str, float], Any]:
    """Median seconds of every primitive of :mod:`cl_vla.benchmarks.inherent` on ``module``'s policy."""
    import numpy as np
    from torch.utils.data import default_collate

    from cl_vla.algorithms.lora import PerTaskLoRA
    from cl_vla.benchmarks.inherent import Primitives, measure_primitives

    train = data.train_dataset(0)

    def batch_of(n: int) -> dict:
        positions = np.linspace(0, len(train) - 1, n).round().astype(int)
        return module.preprocessor(dict(default_collate([train[int(i)] for i in positions])))

    trainer = getattr(module, "_trainer", None)
    clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
    prims = Primitives(
        module.policy,
        batch_of,
        batch_size=args.batch,
        memory_batch=args.memory_batch or args.batch,
        replayed=math.floor(0.5 * args.batch),  # DER++'s replay_batch_ratio
        grad_clip=float(clip) if clip else None,
        lora=PerTaskLoRA().settings,
    )
    return measure_primitives(prims, reps=args.reps), prims


def calibration_seconds(prims: Any, reps: int = 10) -> float:
    """Median seconds of one fixed plain training step (the same policy copy and batch every time):
    how fast the machine is right now, so runs minutes apart can be compared (see :func:`run_bench`)."""
    from cl_vla.benchmarks.inherent import measure_primitives

    return measure_primitives(prims, reps, names=("step",))["step"]


def run_bench(algos: list[str], args: BenchArgs, console: Console) -> dict[str, dict]:
    """Every algorithm's row; the primitives are timed after ``sequential``'s first run.

    With ``args.rounds`` > 1 every algorithm runs once a round, in the same order each round, so a
    slow spell of a shared machine hits one round of each, not one algorithm: ``row["rounds"]`` holds
    each round's steps/s and ``row["steps_per_s"]`` the best of them (see :func:`_paired_ratios`).

    Right after each run the bench also times one fixed plain training step
    (:func:`calibration_seconds`, ``row["calibrations"]``): a probe of the machine's speed, kept in
    the figures but not used in the ratios. Dividing by it was tried (2026-12-03, quiet machine): the
    probe, taken while the finished run's loader workers wind down, varied 0.047-0.095 s where the
    runs themselves varied +-15 %, so it added noise (EWC came out 0.71x of sequential) instead of
    cancelling drift. The ratios come from each algorithm's best round (:func:`_paired_ratios`)."""
    rows: dict[str, dict] = {}
    keep: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cl_vla_bench_") as tmp:
        for r in range(args.rounds):
            for algo in algos:
                where = f"round {r + 1}/{args.rounds}, " if args.rounds > 1 else ""
                console.print(f"[bold]bench[/]: {algo} ({where}{args.steps} steps/task, batch {args.batch})")
                first_seq = algo == "sequential" and r == 0
                row = run_one(algo, args, Path(tmp) / f"round{r}", primitives=first_seq, keep=keep)
                rows.setdefault(algo, row).setdefault("rounds", []).append(row["steps_per_s"])
                if "primitives" in keep:
                    rows[algo].setdefault("calibrations", []).append(calibration_seconds(keep["primitives"]))
    for row in rows.values():
        row["steps_per_s"] = max(row["rounds"])
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps per task")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--algorithms", default="all", help="comma-separated conf/algorithm choices, or 'all'")
    p.add_argument("--model", default="tiny_vla", help="a conf/model choice, e.g. smolvla_tiny")
    p.add_argument("--memory-batch", type=int, help="GEM / A-GEM memory batch (default: --batch)")
    p.add_argument("--reps", type=int, default=20, help="rounds of the inherent-cost timings")
    p.add_argument(
        "--rounds", type=int, default=1, help="runs of every algorithm, interleaved (ratios: best rounds)"
    )
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cl_vla.paths import conf_dir

    known = sorted(q.stem for q in (conf_dir() / "algorithm").glob("*.yaml"))
    algos = (
        ["sequential", *(x for x in known if x != "sequential")]
        if a.algorithms == "all"
        else a.algorithms.split(",")
    )
    unknown = [x for x in algos if x not in known]
    if unknown:
        p.error(f"unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'all'.")
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}.")
    if "sequential" in algos:  # its run yields the trained policy the primitives are timed on
        algos = ["sequential", *(x for x in algos if x != "sequential")]
    args = BenchArgs(
        a.steps,
        a.batch,
        a.workers,
        a.model,
        a.memory_batch,
        a.reps,
        rounds=a.rounds,
        overrides=list(a.overrides),
    )
    # Logs and CI have no terminal width; keep the table on one line per algorithm there.
    console = Console(width=None if sys.stdout.isatty() else 160)
    rows = run_bench(algos, args, console)
    tables = bench_tables(rows, args)
    for title, header, cells in tables:
        t = Table(title=title)
        for c in header:
            t.add_column(c, justify="right")
        for row in cells:
            t.add_row(*row)
        console.print(t)
    if a.markdown is not None:
        a.markdown.write_text("\n".join(markdown_table(*tbl) for tbl in tables))
    return rows


def title_of(args: BenchArgs) -> str:
    threads = args.threads or torch.get_num_threads()
    rounds = (
        f", best of {args.rounds} interleaved rounds (steps/s: best (median); time vs sequential: best"
        " round over sequential's best round (min-max of the per-round ratios))"
        if args.rounds > 1
        else ""
    )
    return (
        f"task-2 steady-state training speed, {args.model}, batch {args.batch}, {args.workers} workers, "
        f"{threads} threads, {args.steps} steps/task{rounds}"
    )


def bench_tables(rows: dict[str, dict], args: BenchArgs) -> list[tuple[str, list[str], list[list[str]]]]:
    """The speed table (with limits when ``sequential`` ran) and the primitives' table, if timed."""
    header, cells = bench_rows(rows)
    tables = [(title_of(args), header, cells)]
    prims = rows.get("sequential", {}).get("primitives")
    if prims:
        tables.append(
            (
                f"inherent primitives, median of {args.reps} interleaved rounds "
                f"(memory batch {args.memory_batch or args.batch})",
                ["primitive", "ms", "x compute step"],
                [[k, f"{v * 1e3:.2f}", f"{v / prims['step']:.3f}"] for k, v in prims.items()],
            )
        )
    return tables


def markdown_table(title: str, header: list[str], cells: list[list[str]]) -> str:
    """A titled table: the first column names the row, the others are right-aligned figures."""
    from cl_vla.results.tables import markdown_table as table

    return f"{title}\n\n{table(header, cells, right=range(1, len(header)))}\n"


def bench_rows(rows: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The speed table: times relative to ``sequential`` (else the first algorithm), and each
    algorithm's limit (``sequential``'s step + its inherent extra work) when the primitives were timed."""
    from cl_vla.benchmarks.inherent import EXTRA_WORK, extra_seconds

    base_row = rows.get("sequential", next(iter(rows.values())))
    prims = base_row.get("primitives")
    decoded = next(iter(rows.values()))["decoded_bytes"]
    header = [
        "algorithm",
        "steps/s",
        "time vs sequential",
        "inherent extra work",
        "extra ms/step",
        "limit",
        "measured / limit",
        "within 10 %",
        "extra memory",
        "stored samples",
        f"bytes/stored sample (decoded: {decoded:,})",
    ]
    cells = []
    for algo, r in rows.items():
        extra = extra_seconds(algo, prims) if prims else None
        vs_base, pairs, vs_limit, limit = _paired_ratios(r, base_row, extra)
        per = r["state_bytes"] / r["stored"] if r["stored"] else None
        work = EXTRA_WORK.get(algo)
        time_cell = f"{vs_base:.3f}"
        if len(pairs) > 1:
            time_cell += f" ({min(pairs):.2f}-{max(pairs):.2f})"
        steps_cell = f"{max(r.get('rounds', [r['steps_per_s']])):.2f}"
        if len(r.get("rounds", [])) > 1:
            steps_cell += f" ({statistics.median(r['rounds']):.2f})"
        cells.append(
            [
                algo,
                steps_cell,
                time_cell,
                work.what if work else "-",
                "-" if extra is None else f"{extra * 1e3:.1f}",
                "-" if limit is None else f"{limit:.3f}",
                "-" if vs_limit is None else f"{vs_limit:.3f}",
                "-" if vs_limit is None else ("yes" if vs_limit <= WITHIN else "NO"),
                _size(r["state_bytes"]),
                str(r["stored"]) if r["stored"] else "-",
                f"{per:.1f}" if per else "-",
            ]
        )
    return header, cells


def _paired_ratios(
    row: dict, base_row: dict, extra: float | None
) -> tuple[float, list[float], float | None, float | None]:
    """The verdict ratios from each side's fastest round, and the per-round pairs for the spread.

    Returns the best round's step time over the base's best (``time vs sequential``), the same ratio
    per round (a round's run over the base's run of that round: its min-max shows the spread), the
    best time over the limit (the base's best step + ``extra``) and that limit over the base's best.
    A shared machine's disturbances (another process, a loader worker's page faults) only ever slow a
    run down, so the fastest round is the least disturbed reading of each (as ``timeit`` takes the
    minimum); a median still moved by 0.26 between two 3-round benches and a slow spell that hit two of
    six runs of one algorithm decided its row (see bench_notes.md). Without rounds: one value each.
    The machine-speed probes (``row["calibrations"]``) are not used: see :func:`run_bench`."""
    times = [1.0 / s for s in row.get("rounds", [row["steps_per_s"]])]
    bases = [1.0 / s for s in base_row.get("rounds", [base_row["steps_per_s"]])]
    pairs = [t / b for t, b in zip(times, bases, strict=True)] if len(times) == len(bases) else []
    best, base = min(times), min(bases)
    if extra is None:
        return best / base, pairs, None, None
    return best / base, pairs, best / (base + extra), (base + extra) / base


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


if __name__ == "__main__":
    main()
