"""The headline table: every algorithm x 3 seeds on the discriminating Meta-World sequence (mw_cw5,
`experiment=metaworld_cw`, tuned settings from conf/algorithm_settings/metaworld_cw/), final success
(ACC), BWT, FWT and forgetting as mean ± std over seeds, and its plot. One command, resumable:

    .venv/bin/python experiments/metaworld_cw_table.py                 # run what is missing, then the table
    .venv/bin/python experiments/metaworld_cw_table.py --table-only    # the table of whatever finished

Runs are long (about 10-15 min each on a quiet 2-core CPU, 30 min on a shared one), so the command is
meant to be run again and again: a run with results.json is skipped, a run that was interrupted (it has
run.json) is continued from its last checkpoint with `resume=<its dir>`, a run never started is started.
One run at a time (it uses one torch thread and `eval.num_workers` simulator processes). Every run goes to
`<out>/<NN>_algorithm=<a>,seed=<s>/`, so `python -m cl_vla.results.sweep_report <out>` reads the
directory as one sweep (the script writes its sweep.json), and every run is in one W&B group
(`experiment.group=metaworld_cw_table/<out dir name>`, tag `metaworld_cw_table`).

Every finished run is also written to the committed ledger `docs/results/ledger/metaworld_cw_table.jsonl`
(settings, metrics, R matrix, wall time, commit; `experiments/_ledger.py`): the run directories stay on the
machine that ran them, the ledger goes on with the repository, so the next invocation on another machine
skips what any machine finished and still tables it. Commit the ledger after a stretch of runs.

A run whose algorithm settings are no longer the experiment's (conf/algorithm/ merged with
conf/algorithm_settings/metaworld_cw/, e.g. after a new tuning) is left out of the table and listed as
stale; the next invocation moves its directory aside (`.<name>.stale-<time>`, kept) and runs the job
anew with the current settings (a stale ledger entry stays in the ledger, out of the table).

To end a stretch without losing a run, create `<out>/STOP`: the script finishes the run in progress,
then stops (and removes the file), so the machine is free for something else, e.g. a timing benchmark.

`--order seed` (default) runs seed 0 of every algorithm first, then seed 1, then seed 2, so a partial
table has every algorithm; `--order algorithm` finishes an algorithm's seeds before the next one.
Extra arguments after `--` are Hydra overrides for every run (e.g. `-- trainer=gpu`); they are part of
the sweep's identity, so keep them the same across invocations on one directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import _driver
import _ledger
import numpy as np

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = (
    "sequential",
    "er",
    "derpp",
    "mir",
    "agem",
    "gem",
    "ewc",
    "ewc_online",
    "si",
    "lwf",
    "packnet",
    "lora_per_task",
    "multitask",
)
METRICS = ("acc", "bwt", "fwt", "forgetting")
LABELS = {"acc": "ACC ↑", "bwt": "BWT ↑", "fwt": "FWT ↑", "forgetting": "Forgetting ↓"}
EXPERIMENT = "metaworld_cw"
NAME = "metaworld_cw_table"
TIMES = "times.jsonl"  # every attempt, finished or not (this machine)
STOP = "STOP"  # created by hand: end the stretch after the run in progress

#: ``{algorithm: [(seed, metrics with "matrix"), ...]}``
Found = dict[str, list[tuple[int, dict]]]


def job_name(index: int, algo: str, seed: int) -> str:
    return f"{index:02d}_algorithm={algo},seed={seed}"


def algorithm_of(run_dir: Path) -> str:
    """The algorithm of a run directory named by :func:`job_name`."""
    return run_dir.name.split("algorithm=")[1].split(",")[0]


def jobs(algorithms: list[str], seeds: list[int], order: str) -> list[tuple[int, str, int]]:
    """``(index, algorithm, seed)``; the index is fixed by ALGORITHMS x seeds, whatever the order."""
    index = {(a, s): i for i, (a, s) in enumerate((a, s) for a in ALGORITHMS for s in range(3))}
    pairs = (
        [(a, s) for s in seeds for a in algorithms]
        if order == "seed"
        else [(a, s) for a in algorithms for s in seeds]
    )
    return [(index.get((a, s), 100 + i), a, s) for i, (a, s) in enumerate(pairs)]


def base_overrides(out: Path, extra: list[str], experiment: str = EXPERIMENT) -> list[str]:
    return [
        f"experiment={experiment}",
        f"experiment.name={NAME}",
        f"experiment.group={NAME}/{out.name}",
        f"logger.wandb.tags=[{NAME}]",
        "trainer.progress_bar=false",
        *extra,
    ]


def claim_sweep(out: Path, base: list[str]) -> None:
    """Write ``sweep.json`` so the sweep report and a second invocation see one sweep (algorithm x seed)."""
    sys.path.insert(0, str(REPO / "src"))
    from cl_vla.tracking.sweep import IGNORED_KEYS, SweepError, SweepSpec, claim, job_overrides

    ov = job_overrides(base)
    spec = SweepSpec(
        "config",
        tuple(sorted(f"{k}={v}" for k, v in ov.items() if k not in IGNORED_KEYS)),
        ("algorithm", "seed"),
    )
    try:
        claim(out, spec)
    except SweepError as exc:
        sys.exit(f"error: {exc}")


def in_ledger(algo: str, seed: int, experiment: str = EXPERIMENT, settings: dict | None = None) -> bool:
    """Whether some machine finished ``(algo, seed)`` with ``settings`` (default: the experiment's
    current ones)."""
    expected = expected_settings(algo, experiment) if settings is None else settings
    return any(
        e["algorithm"] == algo and e["seed"] == seed and not _ledger.differing(e["settings"], expected)
        for e in _ledger.read(NAME)
    )


def record(run_dir: Path, algo: str) -> None:
    """Put a finished run into the ledger, unless it holds that algorithm and seed with these settings."""
    summary = _ledger.run_summary(run_dir)
    if summary is not None and not in_ledger(algo, summary["seed"], settings=summary["settings"]):
        _ledger.append(NAME, {**summary, "algorithm": algo, "run": run_dir.name})


def run_dirs(out: Path) -> list[Path]:
    """The job directories under ``out`` (not those moved aside as stale: their names start with a dot)."""
    return sorted(d for d in out.glob("*_algorithm=*,seed=*") if not d.name.startswith("."))


def stale(run_dir: Path, algo: str, experiment: str = EXPERIMENT) -> bool:
    """Whether ``run_dir`` (finished or interrupted) ran with other algorithm settings than the
    experiment's current ones (e.g. from before a new tuning)."""
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        return False
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.load(resolved).algorithm)
    return bool(_ledger.differing(settings, expected_settings(algo, experiment)))


def finished(out: Path, index: int, algo: str, seed: int, experiment: str = EXPERIMENT) -> bool:
    """Whether the job finished here (its directory has results.json, with the current settings) or on
    some machine (the ledger)."""
    run_dir = out / job_name(index, algo, seed)
    here = (run_dir / "results.json").is_file() and not stale(run_dir, algo, experiment)
    return here or in_ledger(algo, seed, experiment)


def run_one(
    python: str, out: Path, index: int, algo: str, seed: int, base: list[str], experiment: str = EXPERIMENT
) -> None:
    run_dir = out / job_name(index, algo, seed)
    if finished(out, index, algo, seed, experiment):
        return  # finished here (main records it) or on some machine
    if stale(run_dir, algo, experiment):  # kept aside, out of the table's glob; the job runs anew
        aside = run_dir.with_name(f".{run_dir.name}.stale-{time.strftime('%Y%m%d%H%M%S')}")
        run_dir.rename(aside)
        print(f"{time.strftime('%H:%M:%S')} {run_dir.name}: other settings than now, moved to {aside.name}")
    args = [*base, f"algorithm={algo}", f"seed={seed}", f"hydra.run.dir='{run_dir}'"]
    if (run_dir / "run.json").is_file():  # started before: continue it from its last checkpoint
        args.append(f"resume='{run_dir}'")
    (out / ".logs").mkdir(parents=True, exist_ok=True)
    log = out / ".logs" / f"{run_dir.name}.log"
    print(
        f"{time.strftime('%H:%M:%S')} {run_dir.name}{' (resumed)' if 'resume=' in args[-1] else ''}",
        flush=True,
    )
    tic = time.time()
    with open(log, "a", encoding="utf-8") as f:
        rc = subprocess.call(
            [python, str(REPO / "train.py"), *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT
        )
    seconds = time.time() - tic
    with open(out / TIMES, "a", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {
                    "run": run_dir.name,
                    "rc": rc,
                    "seconds": round(seconds, 1),
                    "resumed": "resume=" in args[-1],
                    "end": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            + "\n"
        )
    print(f"  rc={rc} {seconds / 60:.1f} min", flush=True)
    if rc == 0:
        record(run_dir, algo)


# ------------------------------------------------------------------------------------------ the table


def expected_settings(algo: str, experiment: str = EXPERIMENT) -> dict:
    """The algorithm's settings the experiment runs now: conf/algorithm/<a>.yaml, then the experiment's
    conf/algorithm_settings/<experiment>/<a>.yaml (without interpolated values such as the seed)."""
    from omegaconf import OmegaConf

    conf = REPO / "conf"
    cfg = OmegaConf.load(conf / "algorithm" / f"{algo}.yaml")
    own = conf / "algorithm_settings" / experiment / f"{algo}.yaml"
    if own.is_file():
        cfg = OmegaConf.merge(cfg, {k: v for k, v in OmegaConf.load(own).items() if k != "defaults"})
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if "${" not in str(v)}


def collect(out: Path, experiment: str = EXPERIMENT) -> tuple[Found, list[str], float]:
    """``{algorithm: [(seed, metrics), ...]}`` of the finished runs, from ``out``'s run directories and
    the ledger (one per algorithm and seed), whose settings are the experiment's current ones; one line
    per finished run left out as stale; the wall seconds of the runs kept."""
    summaries = []
    for d in run_dirs(out):
        summary = _ledger.run_summary(d)
        if summary is not None:
            summaries.append({**summary, "algorithm": algorithm_of(d), "run": d.name})
    summaries += _ledger.read(NAME)
    found: dict[str, list[tuple[int, dict]]] = {}
    left_out, seen, seconds = [], set(), 0.0
    for e in summaries:
        algo, seed = e["algorithm"], int(e["seed"])
        if (algo, seed) in seen:
            continue
        if keys := _ledger.differing(e["settings"], expected_settings(algo, experiment)):
            left_out.append(f"{e['run']}: ran with other {', '.join(keys)} than the current settings")
            continue
        seen.add((algo, seed))
        seconds += e.get("seconds") or 0.0
        found.setdefault(algo, []).append((seed, {**e["metrics"], "matrix": e["matrix"]}))
    return found, left_out, seconds


def _cell(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def table(found: dict[str, list[tuple[int, dict]]]) -> str:
    head = "| algorithm | seeds | " + " | ".join(LABELS[m] for m in METRICS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(METRICS)]
    for algo in ALGORITHMS:
        runs = sorted(found.get(algo, []), key=lambda x: x[0])
        seeds = ", ".join(str(s) for s, _ in runs) or "none yet"
        cells = [_cell([m[k] for _, m in runs if m.get(k) is not None]) for k in METRICS]
        lines.append(f"| {algo} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def separated_pairs(found: Found, metric: str = "acc") -> list[tuple[str, str]]:
    """Pairs ``(higher, lower)`` of algorithms with at least 2 seeds each whose ``metric`` spreads do not
    overlap: the lower one's mean + std is below the higher one's mean - std (issue #14's criterion)."""
    spans = {}
    for algo in ALGORITHMS:
        vals = [m[metric] for _, m in found.get(algo, []) if m.get(metric) is not None]
        if len(vals) >= 2:
            mean, std = float(np.mean(vals)), float(np.std(vals, ddof=1))
            spans[algo] = (mean - std, mean + std, mean)
    pairs = []
    for a, (a_lo, _, a_mean) in spans.items():
        for b, (_, b_hi, b_mean) in spans.items():
            if a_mean > b_mean and b_hi < a_lo:
                pairs.append((a, b))
    return sorted(pairs, key=lambda ab: (-spans[ab[0]][2], spans[ab[1]][2]))


def separation(found: Found, metric: str = "acc") -> str:
    """The separated pairs as Markdown lines, those without ``sequential`` first."""
    pairs = separated_pairs(found, metric)
    if not pairs:
        label = LABELS[metric]
        return f"No two algorithms with 2+ seeds have non-overlapping {label} spreads (mean ± std) yet."
    others = [f"{a} > {b}" for a, b in pairs if "sequential" not in (a, b)]
    with_seq = [f"{a} > {b}" for a, b in pairs if "sequential" in (a, b)]
    lines = [f"Pairs whose {LABELS[metric]} spreads (mean ± std, 2+ seeds) do not overlap:"]
    lines.append(f"- besides sequential ({len(others)}): " + (", ".join(others) or "none"))
    lines.append(f"- against sequential ({len(with_seq)}): " + (", ".join(with_seq) or "none"))
    return "\n".join(lines)


def plot(found: dict[str, list[tuple[int, dict]]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    algos = [a for a in ALGORITHMS if found.get(a)]
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    x = np.arange(len(algos))
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        for i, a in enumerate(algos):
            vals = [m[metric] for _, m in found[a] if m.get(metric) is not None]
            if not vals:
                continue
            std = np.std(vals, ddof=1) if len(vals) > 1 else 0.0
            ax.bar(i, np.mean(vals), yerr=std, color="tab:blue", alpha=0.5, capsize=3)
            ax.plot([i] * len(vals), vals, "k.", ms=4)
        ax.set_xticks(x, algos, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{LABELS[metric]} (bar: mean, error bar: std over seeds, dots: seeds)", fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
    fig.suptitle("Meta-World mw_cw5 (5 tasks), tiny_vla, closed-loop success")
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "multirun" / NAME / "main")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--order", choices=("seed", "algorithm"), default="seed")
    p.add_argument("--experiment", default=EXPERIMENT, help="the recipe (another one only to try the script)")
    p.add_argument("--table-only", action="store_true", help="only print/write the table of finished runs")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    p.add_argument("--plot", type=Path, default=None, help="the plot (default: <out>/table.png)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = p.parse_args()
    out = args.out.resolve()
    python = _driver.offline_python()
    if not args.table_only:
        out.mkdir(parents=True, exist_ok=True)
        base = base_overrides(out, args.overrides, args.experiment)
        claim_sweep(out, base)
        for index, algo, seed in jobs(args.algorithms.split(","), args.seeds, args.order):
            if (out / STOP).exists() and not finished(out, index, algo, seed, args.experiment):
                (out / STOP).unlink()
                next_run = job_name(index, algo, seed)
                print(f"{time.strftime('%H:%M:%S')} stopped before {next_run} ({STOP} found)", flush=True)
                break
            run_one(python, out, index, algo, seed, base, args.experiment)
    for d in run_dirs(out):  # also after an interrupted stretch
        record(d, algorithm_of(d))
    found, left_out, seconds = collect(out, args.experiment)
    n = sum(len(v) for v in found.values())
    text = (
        f"{n} of {len(ALGORITHMS) * 3} runs finished ({out.name}/ and the ledger); "
        f"they took {seconds / 3600:.2f} h of wall time together\n\n" + table(found)
    )
    text += "\n\n" + separation(found, "acc")
    if left_out:
        text += "\n\nLeft out (stale settings):\n" + "\n".join(f"- {line}" for line in left_out)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if found:
        plot(found, args.plot or out / "table.png")


if __name__ == "__main__":
    main()
