"""Tuning protocol for the Meta-World headline table (Continual World's: tune on a validation sequence that
shares no task order with the test sequence, then freeze the values for the test):

    .venv/bin/python experiments/tune_metaworld_cw.py [--algorithms er,ewc,...] [--apply]

For each algorithm, one Hydra multirun (`train.py -m`) over a small grid of its main knob(s) (GRID below:
2-3 values, the paper default first) on `experiment=metaworld_cw_val` (mw_cw_val: 3 tasks, seed 0), into
`multirun/tune_metaworld_cw/<algorithm>/`, then its report (`python -m cl_vla.results.sweep_report`).
Selection rule,
fixed before looking: the highest validation ACC (final mean success over the 3 tasks); a tie (equal
ACC) goes to the higher BWT, then to the value listed first (the paper's default). `--apply` writes the
chosen values into conf/algorithm_settings/metaworld_cw/<algorithm>.yaml, which `experiment=metaworld_cw`
(the test sequence) picks up; `--markdown` writes the summary of every grid point and the choice.

Every finished grid point also goes into the committed ledger `docs/results/ledger/tune_metaworld_cw.jsonl`
(`experiments/_ledger.py`), so a later invocation on another machine skips it and still reports it: commit
the ledger after a stretch of runs.

Resumable: a grid point with results.json (or in the ledger) is skipped; an interrupted one (run.json but
no results.json) is moved aside to `.<name>.interrupted` (kept, ignored by the report) and run again; only
the pending values are launched, into the same sweep directory. One run at a time (no parallel
launcher): on 2 CPU cores a validation run takes about 5 min when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

import _driver
import _ledger

REPO = Path(__file__).resolve().parents[1]
NAME = "tune_metaworld_cw"
EXPERIMENT = "metaworld_cw_val"
SETTINGS = REPO / "conf" / "algorithm_settings" / "metaworld_cw"

#: algorithm -> {key: values}; the first value of each key is the conf/algorithm default (the paper's).
GRID: dict[str, dict[str, list[str]]] = {
    "er": {"replay_batch_ratio": ["0.3", "0.1", "0.5"]},
    "derpp": {"alpha": ["0.2", "1.0"], "beta": ["0.5"]},
    "mir": {"mir_candidates": ["50", "25"]},
    "agem": {"memory_batch_size": ["256", "64"]},
    "gem": {"memory_batch_size": ["16", "64"]},
    "ewc": {"ewc_lambda": ["100000.0", "10000.0", "1000.0"]},
    "ewc_online": {"ewc_lambda": ["100000.0", "10000.0", "1000000.0"], "gamma": ["0.9"]},
    "si": {"si_c": ["0.1", "1.0", "10.0"]},
    # 0.3-3 all ended at val ACC 0 (nothing kept, the last task not learned): 0.1, 0.03 go towards sequential.
    "lwf": {"alpha": ["1.0", "0.3", "3.0", "0.1", "0.03"]},
    # PackNet re-trains the kept weights after pruning (the paper; LIBERO: as many epochs as the task).
    "packnet": {"prune_ratio": ["0.75", "0.5"], "finetune_steps": ["0", "100"]},
    "lora_per_task": {"r": ["8", "32"]},
}


def points(algo: str) -> list[dict[str, str]]:
    keys = list(GRID[algo])
    return [dict(zip(keys, vals, strict=True)) for vals in product(*(GRID[algo][k] for k in keys))]


def full_point(algo: str, pt: dict[str, str]) -> dict[str, str]:
    """``pt`` with every grid key it lacks at its first listed value: a point that ran before a key
    joined the grid ran with that key's default, which the grid lists first."""
    return {**{k: values[0] for k, values in GRID[algo].items()}, **pt}


def read_points(sweep: Path, algo: str) -> dict[tuple[tuple[str, str], ...], Path]:
    """``{grid point: job dir}`` of every job directory of ``sweep`` (from its .hydra/overrides.yaml)."""
    sys.path.insert(0, str(REPO / "src"))
    from omegaconf import OmegaConf

    from cl_vla.tracking.sweep import job_overrides

    found = {}
    for d in sorted(p for p in sweep.glob("*") if p.is_dir() and not p.name.startswith((".", "report"))):
        ov = d / ".hydra" / "overrides.yaml"
        if not ov.is_file():
            continue
        o = job_overrides(OmegaConf.to_container(OmegaConf.load(ov)))
        pt = {k.removeprefix("algorithm."): v for k, v in o.items() if k.startswith("algorithm.")}
        found[tuple(sorted(full_point(algo, pt).items()))] = d
    return found


def ledger_metrics(algo: str, pt: dict[str, str], experiment: str = EXPERIMENT) -> dict | None:
    """The validation metrics of grid point ``pt`` from the ledger (any machine), None if not there."""
    for e in _ledger.read(NAME):
        same = e["algorithm"] == algo and e.get("experiment", EXPERIMENT) == experiment
        if same and full_point(algo, e["point"]) == pt:
            return e["metrics"]
    return None


def record(algo: str, sweep: Path, experiment: str = EXPERIMENT) -> None:
    """Put every finished grid point of ``sweep`` that the ledger lacks into it."""
    done = read_points(sweep, algo) if sweep.is_dir() else {}
    for pt in points(algo):
        d = done.get(tuple(sorted(pt.items())))
        summary = _ledger.run_summary(d) if d is not None else None
        if summary is not None and ledger_metrics(algo, pt, experiment) is None:
            _ledger.append(NAME, {**summary, "algorithm": algo, "point": pt, "experiment": experiment})


def pending(algo: str, sweep: Path, experiment: str = EXPERIMENT) -> list[dict[str, str]]:
    """Grid points without results.json; interrupted job dirs are moved aside (kept) so they rerun."""
    done = read_points(sweep, algo) if sweep.is_dir() else {}
    todo = []
    for pt in points(algo):
        d = done.get(tuple(sorted(pt.items())))
        if d is not None and (d / "results.json").is_file():
            continue
        if ledger_metrics(algo, pt, experiment) is not None:
            continue
        if d is not None:
            d.rename(d.with_name(f".{d.name}.interrupted-{time.strftime('%H%M%S')}"))
        todo.append(pt)
    return todo


def launch(
    python: str,
    algo: str,
    todo: list[dict[str, str]],
    sweep: Path,
    extra: list[str],
    experiment: str = EXPERIMENT,
) -> None:
    keys = list(GRID[algo])
    # One multirun over the pending values of each key (the full grid when nothing ran yet). choice(...)
    # keeps a key swept even with one value left, so every launch into the directory is the same sweep.
    swept = [f"algorithm.{k}=choice({','.join(dict.fromkeys(pt[k] for pt in todo))})" for k in keys]
    cmd = [
        python,
        str(REPO / "train.py"),
        "-m",
        f"experiment={experiment}",
        f"experiment.name={NAME}",
        f"algorithm={algo}",
        *swept,
        "seed=0",
        "trainer.progress_bar=false",
        *extra,
        f"hydra.sweep.dir={sweep}",
    ]
    print(f"{time.strftime('%H:%M:%S')} {algo}: {len(todo)} pending: {' '.join(swept)}", flush=True)
    sweep.mkdir(parents=True, exist_ok=True)
    with open(sweep.parent / f"{algo}.log", "a", encoding="utf-8") as f:
        tic = time.time()
        subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        f.write(f"# {algo}: {len(todo)} runs in {time.time() - tic:.0f} s\n")
    subprocess.call(
        [python, "-m", "cl_vla.results.sweep_report", str(sweep), "--metric", "acc", "bwt", "forgetting"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )


def results(algo: str, sweep: Path, experiment: str = EXPERIMENT) -> list[tuple[dict[str, str], dict | None]]:
    """Each grid point's validation metrics: from its run directory here, else from the ledger."""
    done = read_points(sweep, algo) if sweep.is_dir() else {}
    out = []
    for pt in points(algo):
        d = done.get(tuple(sorted(pt.items())))
        res = d / "results.json" if d is not None else None
        if res is not None and res.is_file():
            out.append((pt, json.loads(res.read_text())["metrics"]))
        else:
            out.append((pt, ledger_metrics(algo, pt, experiment)))
    return out


def choose(rows: list[tuple[dict[str, str], dict | None]]) -> dict[str, str] | None:
    """The selection rule: highest ACC, then highest BWT, then the earliest listed (the default)."""
    if any(m is None for _, m in rows):
        return None
    best = max(
        range(len(rows)), key=lambda i: (round(rows[i][1]["acc"], 6), round(rows[i][1]["bwt"] or 0, 6), -i)
    )
    return rows[best][0]


def write_setting(algo: str, pt: dict[str, str], rows: list) -> None:
    path = SETTINGS / f"{algo}.yaml"
    replaced = (*(f"{k}:" for k in pt), "# tuned by ")  # re-applying replaces, never stacks
    lines = (
        [line for line in path.read_text().splitlines() if not line.startswith(replaced)]
        if path.is_file()
        else []
    )
    summary = ", ".join(f"{'/'.join(p.values())}: {m['acc']:.3f}" for p, m in rows)
    lines.append(f"# tuned by experiments/tune_metaworld_cw.py on mw_cw_val, seed 0 (val ACC {summary})")
    lines += [f"{k}: {v}" for k, v in pt.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line for line in lines if line.strip() or line == "") + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", default=",".join(GRID))
    p.add_argument("--out", type=Path, default=REPO / "multirun" / NAME)
    p.add_argument(
        "--experiment", default=EXPERIMENT, help="the validation recipe (another one only to try it)"
    )
    p.add_argument(
        "--summary-only", action="store_true", help="run nothing; record and summarize what finished"
    )
    p.add_argument(
        "--apply", action="store_true", help="write the chosen values into conf/algorithm_settings"
    )
    p.add_argument("--markdown", type=Path, default=None, help="write the summary table here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = p.parse_args()
    python = _driver.offline_python()
    algos = args.algorithms.split(",")
    out = args.out.resolve()
    if not args.summary_only:
        for algo in algos:
            todo = pending(algo, out / algo, args.experiment)
            if todo:
                launch(python, algo, todo, out / algo, args.overrides, args.experiment)
    for algo in algos:  # also after an interrupted stretch: --summary-only records what finished
        record(algo, out / algo, args.experiment)
    lines = ["| algorithm | value(s) | val ACC ↑ | val BWT ↑ | chosen |", "|---|---|---:|---:|---|"]
    for algo in algos:
        rows = results(algo, out / algo, args.experiment)
        pick = choose(rows)
        for pt, m in rows:
            vals = ", ".join(f"{k}={v}" for k, v in pt.items())
            acc = f"{m['acc']:.3f}" if m else "not run"
            bwt = f"{m['bwt']:+.3f}" if m and m.get("bwt") is not None else ""
            lines.append(f"| {algo} | {vals} | {acc} | {bwt} | {'**yes**' if pt == pick else ''} |")
        if pick is not None and args.apply:
            write_setting(algo, pick, rows)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
