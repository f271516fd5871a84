"""Compare the runs of one Hydra sweep, from disk only (no network).

    python -m cl_vla.results.sweep_report multirun/default/2026-01-01_12-00-00 [--out DIR] [--metric acc bwt ...]

Reads every job directory of the sweep (``results.json`` for the numbers, ``.hydra/overrides.yaml`` for
the swept values), groups the complete runs by their swept values except the seed, and writes into
``--out`` (default ``<sweep dir>/report``):

* ``report.md``: the table of each metric's mean ± sample standard deviation over seeds, one row per
  setting; every run with its status; the runs left out (failed, incomplete, foreign) and why;
* ``metrics.png``: each metric against the swept value, error bars = std over seeds, dots = seeds;
* ``r_matrices.png``: the seed-averaged R matrix of each setting, side by side on one colour scale;
* ``report.json``: the same numbers for scripts.

The sweep's swept keys come from ``sweep.json`` (written at launch by :class:`cl_vla.tracking.sweep.SweepGuard`),
else from ``multirun.yaml``, else from what differs between the runs. A directory whose runs do not
share one base configuration (two sweeps written into one directory) is refused with one sentence.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cl_vla.evaluation.metrics import LEVEL_METRICS, SCALAR_METRICS
from cl_vla.results.run_files import METRIC_LABELS, RESULTS_JSON, read_results, short_task_label
from cl_vla.tracking.sweep import (
    JOB_STATUS,
    MARKER,
    SweepError,
    SweepSpec,
    job_overrides,
    read_marker,
    spec_from_config,
)

DEFAULT_METRICS = ("acc", "bwt", "forgetting", "fwt")
REPORT_MD = "report.md"
_REPORT_TAG = ".cl_vla_report"  # marks an output directory, so a later report does not read it as a run
_LOWER_IS_BETTER = frozenset({"forgetting", "max_forgetting", "libero_nbt"})


class ReportError(ValueError):
    """The sweep directory cannot be reported on; the message is one sentence."""


# ------------------------------------------------------------------------------------------- reading


@dataclass
class Run:
    name: str
    path: Path
    status: str  # complete | incomplete | failed | foreign | duplicate
    reason: str = ""
    overrides: dict[str, str] = field(default_factory=dict)
    config_name: str | None = None
    swept: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] | None = None

    def seed(self, key: str) -> str:
        """The run's seed: its swept value, else the one its results record."""
        if key in self.swept:
            return self.swept[key]
        seed = (self.results or {}).get("extra", {}).get(key)
        return "?" if seed is None else str(seed)

    def metric(self, name: str) -> float | None:
        if self.results is None:
            return None
        v = self.results["metrics"].get(name)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass
class Group:
    """The complete runs of one setting (equal swept values except the seed)."""

    values: tuple[tuple[str, str], ...]
    runs: list[Run]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values) or "all runs"

    def stats(self, metric: str) -> tuple[float | None, float | None, int]:
        """``(mean, sample std, n)`` over the runs where ``metric`` is defined; std is None for n < 2."""
        vals = [v for r in self.runs if (v := r.metric(metric)) is not None]
        if not vals:
            return None, None, 0
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        return float(np.mean(vals)), std, len(vals)

    def mean_matrix(self) -> np.ndarray | None:
        mats = [r.results["matrix"] for r in self.runs if r.results is not None]
        if not mats or len({m.shape for m in mats}) != 1:
            return None
        return np.mean(np.stack(mats), axis=0)


@dataclass
class Sweep:
    path: Path
    spec: SweepSpec
    spec_source: str
    runs: list[Run]
    seed_key: str = "seed"

    @property
    def complete(self) -> list[Run]:
        return [r for r in self.runs if r.status == "complete"]

    @property
    def left_out(self) -> list[Run]:
        return [r for r in self.runs if r.status != "complete"]

    @property
    def setting_keys(self) -> list[str]:
        return [k for k in self.spec.swept if k != self.seed_key]

    def groups(self) -> list[Group]:
        by: dict[tuple[tuple[str, str], ...], list[Run]] = {}
        for r in self.complete:
            key = tuple((k, r.swept.get(k, "")) for k in self.setting_keys)
            by.setdefault(key, []).append(r)
        return [Group(k, by[k]) for k in sorted(by, key=lambda k: [_sort_key(v) for _, v in k])]


def _sort_key(value: str) -> tuple[int, float, str]:
    num = _as_number(value)
    return (0, num, "") if num is not None else (1, 0.0, value)


def _as_number(value: str) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _job_sort_key(path: Path) -> tuple[int, str]:
    m = re.match(r"(\d+)_", path.name)
    return (int(m.group(1)) if m else 1 << 30, path.name)


def _read_job(path: Path) -> Run:
    """A job directory's overrides and config name; ``foreign`` when it is not a Hydra job."""
    from omegaconf import OmegaConf

    run = Run(path.name, path, "pending")
    ov = path / ".hydra" / "overrides.yaml"
    if not ov.is_file():
        run.status, run.reason = "foreign", "not a Hydra job directory (no .hydra/overrides.yaml)"
        return run
    try:
        lines = OmegaConf.to_container(OmegaConf.load(ov))
        if not isinstance(lines, list):
            raise ValueError("not a list")
        run.overrides = job_overrides(lines)
    except Exception as exc:
        run.status, run.reason = "foreign", f"unreadable .hydra/overrides.yaml ({str(exc).splitlines()[0]})"
        return run
    try:
        hydra_cfg = OmegaConf.load(path / ".hydra" / "hydra.yaml")
        run.config_name = str(OmegaConf.select(hydra_cfg, "hydra.job.config_name", default=None))
    except Exception:
        run.config_name = None
    return run


def _infer_spec(jobs: list[Run]) -> SweepSpec:
    """Without sweep.json or multirun.yaml: swept keys are those whose values differ between runs."""
    keys = sorted({k for r in jobs for k in r.overrides})
    swept = [k for k in keys if len({r.overrides.get(k) for r in jobs}) > 1]
    names = sorted({r.config_name for r in jobs if r.config_name}) or ["config"]
    base = tuple(sorted(f"{k}={v}" for k, v in jobs[0].overrides.items() if k not in swept))
    return SweepSpec(names[0], base, tuple(swept))


def _status(run: Run) -> None:
    """Set ``complete`` / ``incomplete`` / ``failed`` from the run's files."""
    path = run.path
    if (path / RESULTS_JSON).is_file():
        try:
            run.results = read_results(path)
        except ValueError as exc:
            run.status, run.reason = "failed", str(exc).rstrip(".")
            return
        m = run.results["metrics"]
        learned, total = m.get("tasks_learned"), m.get("num_tasks", len(run.results["task_names"]))
        if isinstance(learned, int) and learned < total:
            run.status, run.reason = "incomplete", f"results.json holds {learned} of {total} tasks"
        else:
            run.status = "complete"
        return
    job = {}
    if (path / JOB_STATUS).is_file():
        try:
            job = json.loads((path / JOB_STATUS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            job = {}
    if job.get("status") == "FAILED":
        run.status, run.reason = "failed", f"the job raised: {job.get('error') or 'unknown error'}"
        return
    if job.get("status") == "COMPLETED":
        run.status, run.reason = "failed", "the job ended without writing results.json"
        return
    state = path / "checkpoints" / "state.json"
    if state.is_file():
        try:
            st = json.loads(state.read_text(encoding="utf-8"))
            run.reason = f"no results.json; its checkpoints cover {st['task']} of {st['num_tasks']} tasks"
        except (OSError, ValueError, KeyError, TypeError):
            run.reason = "no results.json; it has checkpoints (interrupted or still running)"
    else:
        run.reason = "no results.json (still running, killed, or failed before training)"
    run.status = "incomplete"


def load_sweep(sweep_dir: str | Path, *, seed_key: str = "seed", skip: Sequence[str | Path] = ()) -> Sweep:
    """Read every job of ``sweep_dir``; raises ReportError (one sentence) for a directory it refuses."""
    from omegaconf import OmegaConf

    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; give the sweep directory of a `train.py -m` run.")
    skipped = {Path(p).resolve() for p in skip}
    try:
        spec, source = read_marker(root), MARKER
    except SweepError as exc:
        raise ReportError(str(exc)) from exc
    multirun_spec = None
    if (root / "multirun.yaml").is_file():
        try:
            multirun_spec = spec_from_config(OmegaConf.load(root / "multirun.yaml"))
        except Exception:
            multirun_spec = None
    if spec is not None and multirun_spec is not None and multirun_spec.identity != spec.identity:
        raise ReportError(
            f"{root} mixes two sweeps: the launch that wrote its multirun.yaml has "
            f"{spec.difference(multirun_spec)} (vs. its {MARKER}); give each sweep its own hydra.sweep.dir."
        )
    if spec is None and multirun_spec is not None:
        spec, source = multirun_spec, "multirun.yaml"

    runs: list[Run] = []
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=_job_sort_key):
        if d.name.startswith(".") or d.resolve() in skipped or (d / _REPORT_TAG).exists():
            continue
        runs.append(_read_job(d))
    jobs = [r for r in runs if r.status == "pending"]
    if not runs:
        raise ReportError(f"{root} holds no run directories; is it the sweep directory of `train.py -m`?")
    if spec is None:
        spec, source = (_infer_spec(jobs), "inferred from the runs") if jobs else (SweepSpec("", (), ()), "")

    for r in jobs:
        r.swept = {k: r.overrides[k] for k in spec.swept if k in r.overrides}
        mine = SweepSpec(r.config_name or spec.config_name, spec.base_of(r.overrides), tuple(sorted(r.swept)))
        if mine.identity != spec.identity:
            raise ReportError(
                f"{root} mixes runs of more than one sweep: {r.name} has {spec.difference(mine)}; "
                f"give each sweep its own hydra.sweep.dir."
            )
        _status(r)

    # The same setting and seed twice (a job re-run under another number): keep the newest result.
    newest: dict[tuple[tuple[str, str], ...], Run] = {}
    for r in jobs:
        if r.status != "complete":
            continue
        key = tuple(sorted(r.swept.items()))
        old = newest.get(key)
        if old is None:
            newest[key] = r
            continue
        keep, drop = (
            (r, old)
            if (r.path / RESULTS_JSON).stat().st_mtime >= (old.path / RESULTS_JSON).stat().st_mtime
            else (old, r)
        )
        drop.status, drop.reason = "duplicate", f"same swept values as {keep.name}, which is newer"
        newest[key] = keep
    return Sweep(root, spec, source, runs, seed_key)


# ------------------------------------------------------------------------------------------ writing


def _direction(metric: str, higher_is_better: bool) -> str:
    if metric in LEVEL_METRICS:
        return "↑" if higher_is_better else "↓"
    return "↓" if metric in _LOWER_IS_BETTER else "↑"


def _label(metric: str) -> str:
    return METRIC_LABELS.get(metric, (metric, ""))[0]


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def results_table(sweep: Sweep, metrics: Sequence[str]) -> str:
    """The Markdown table: one row per setting, each metric as mean ± std over seeds."""
    hib = _higher_is_better(sweep)
    head = [*sweep.setting_keys, f"runs ({sweep.seed_key})"]
    head += [f"{_label(m)} {_direction(m, hib)}" for m in metrics]
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |"]
    lines.append("|" + "|".join(["---"] * len(sweep.setting_keys) + ["---"] + ["---:"] * len(metrics)) + "|")
    for g in sweep.groups():
        seeds = ", ".join(r.seed(sweep.seed_key) for r in g.runs)
        row = [v for _, v in g.values] + [f"{len(g.runs)} ({seeds})"]
        row += [_fmt(*g.stats(m)) for m in metrics]
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _higher_is_better(sweep: Sweep) -> bool:
    return bool(sweep.complete[0].results["higher_is_better"]) if sweep.complete else True


def _runs_table(sweep: Sweep, metrics: Sequence[str]) -> str:
    keys = list(sweep.spec.swept)
    head = ["run", "status", *keys, *(_label(m) for m in metrics), "note"]
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in sweep.runs:
        vals = [r.swept.get(k, "") for k in keys]
        ms = [f"{v:.4f}" if (v := r.metric(m)) is not None else "" for m in metrics]
        cells = [f"`{r.name}`", r.status, *vals, *ms, r.reason]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def metrics_figure(sweep: Sweep, metrics: Sequence[str]):
    """Each metric against the swept value (mean ± std over seeds, seeds as dots); None if nothing varies."""
    groups = sweep.groups()
    keys = sweep.setting_keys
    if not groups or not keys:
        return None
    numeric = [k for k in keys if all(_as_number(dict(g.values)[k]) is not None for g in groups)]
    x_key = numeric[0] if numeric else None
    series: dict[str, list[Group]] = {}
    for g in groups:
        rest = ", ".join(f"{k}={v}" for k, v in g.values if k != x_key)
        series.setdefault(rest, []).append(g)
    categories = [g.label for g in groups]
    hib = _higher_is_better(sweep)
    fig = _new_figure(4.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        for s_label, gs in series.items():
            xs, means, errs, dots_x, dots_y = [], [], [], [], []
            for g in gs:
                mean, std, _ = g.stats(m)
                if mean is None:
                    continue
                x = _as_number(dict(g.values)[x_key]) if x_key else categories.index(g.label)
                xs.append(x)
                means.append(mean)
                errs.append(std or 0.0)
                for r in g.runs:
                    if (v := r.metric(m)) is not None:
                        dots_x.append(x)
                        dots_y.append(v)
            if not xs:
                continue
            line = ax.errorbar(
                xs, means, yerr=errs, marker="o", capsize=4, linestyle="-" if x_key else "none", label=s_label
            )
            ax.scatter(dots_x, dots_y, s=12, alpha=0.45, color=line[0].get_color(), zorder=3)
        ax.set_title(f"{_label(m)} ({'higher' if _direction(m, hib) == '↑' else 'lower'} is better)")
        ax.set_xlabel(x_key or "setting")
        if not x_key:
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.grid(alpha=0.3)
        if any(series) and len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{sweep.path.name}: mean ± std over seeds ({sweep.seed_key})")
    return fig


def matrices_figure(sweep: Sweep):
    """The seed-averaged R matrix of every setting, side by side on one colour scale."""
    import matplotlib

    groups = [(g, m) for g in sweep.groups() if (m := g.mean_matrix()) is not None]
    if not groups:
        return None
    hib = _higher_is_better(sweep)
    finite = np.concatenate([m[np.isfinite(m)] for _, m in groups])
    if hib and finite.size and ((finite >= 0) & (finite <= 1)).all():
        vmin, vmax = 0.0, 1.0
    else:
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    T = max(m.shape[0] for _, m in groups)
    cell = 0.5 if T <= 10 else 0.28
    fig = _new_figure(cols * (2.0 + T * cell) + 1.8, rows * (1.8 + T * cell))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    cmap = matplotlib.colormaps["RdYlGn" if hib else "RdYlGn_r"].with_extremes(bad="#d9d9d9")
    image = None
    for ax, (g, m) in zip(axes, groups, strict=False):
        image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax)
        n = m.shape[0]
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xlabel("evaluated task j", fontsize=8)
        ax.set_ylabel("after task i", fontsize=8)
        ax.set_title(f"{g.label}\n(mean of {len(g.runs)})", fontsize=8)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    metric = sweep.complete[0].results["metric_name"]
    bar = fig.colorbar(image, ax=list(axes[: len(groups)]), shrink=0.8)
    bar.set_label(f"{metric} ({'higher' if hib else 'lower'} is better)", fontsize=8)
    return fig


def write_report(
    sweep: Sweep, out_dir: str | Path, metrics: Sequence[str] = DEFAULT_METRICS
) -> dict[str, Path]:
    """Write report.md, report.json and the PNGs into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / _REPORT_TAG).write_text("written by python -m cl_vla.results.sweep_report\n")
    paths: dict[str, Path] = {}
    figures = {"metrics": metrics_figure(sweep, metrics), "r_matrices": matrices_figure(sweep)}
    for name, fig in figures.items():
        if fig is not None:
            paths[name] = out / f"{name}.png"
            fig.savefig(paths[name], dpi=110)

    counts: dict[str, int] = {}
    for r in sweep.runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    first = sweep.complete[0].results if sweep.complete else None
    md = [f"# Sweep report: {sweep.path.name}", ""]
    md.append(f"- directory: `{sweep.path}`")  # as given: a shared report names no machine path
    swept = ", ".join(f"`{k}`" for k in sweep.spec.swept) or "nothing"
    md.append(f"- config: `{sweep.spec.config_name}`; swept: {swept} ({sweep.spec_source})")
    md.append(f"- base overrides: {', '.join(f'`{b}`' for b in sweep.spec.base) or 'none'}")
    md.append("- runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if first is not None:
        direction = "higher" if first["higher_is_better"] else "lower"
        md.append(f"- R matrix: `{first['metric_name']}` ({direction} is better)")
        md.append(
            "- tasks: " + "; ".join(short_task_label(i, t, 48) for i, t in enumerate(first["task_names"]))
        )
    md += ["", "## Results", ""]
    if sweep.complete:
        md += [
            f"Mean ± sample standard deviation (n-1) over the seeds (`{sweep.seed_key}`) of each setting; "
            "↑ / ↓: higher / lower is better.",
            "",
            results_table(sweep, metrics),
        ]
    else:
        md.append("No complete run yet.")
    if "metrics" in paths:
        md += ["", f"![metrics vs swept value]({paths['metrics'].name})"]
    if "r_matrices" in paths:
        md += ["", f"![R matrices]({paths['r_matrices'].name})"]
    if sweep.left_out:
        md += ["", "## Left out", ""]
        md += [f"- `{r.name}`: {r.status} — {r.reason}" for r in sweep.left_out]
    md += ["", "## Runs", "", _runs_table(sweep, metrics), ""]
    paths["markdown"] = out / REPORT_MD
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")

    data = {
        "sweep_dir": str(sweep.path),
        "spec": sweep.spec.to_json(),
        "spec_source": sweep.spec_source,
        "seed_key": sweep.seed_key,
        "metrics": list(metrics),
        "groups": [
            {
                "values": dict(g.values),
                "runs": [r.name for r in g.runs],
                "stats": {m: dict(zip(("mean", "std", "n"), g.stats(m), strict=True)) for m in metrics},
            }
            for g in sweep.groups()
        ],
        "runs": [
            {
                "name": r.name,
                "status": r.status,
                "reason": r.reason,
                "swept": r.swept,
                "metrics": {m: r.metric(m) for m in metrics},
            }
            for r in sweep.runs
        ],
    }
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cl_vla.results.sweep_report", description="Tables and plots comparing the runs of one Hydra sweep."
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (hydra.sweep.dir) of `train.py -m`")
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: <sweep_dir>/report)"
    )
    parser.add_argument(
        "--metric",
        action="extend",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"metrics to compare (default: {' '.join(DEFAULT_METRICS)}); any of {', '.join(SCALAR_METRICS)}",
    )
    parser.add_argument("--seed-key", default="seed", help="the swept key averaged over (default: seed)")
    args = parser.parse_args(argv)
    metrics = list(dict.fromkeys(args.metric or DEFAULT_METRICS))
    try:
        bad = [m for m in metrics if m not in SCALAR_METRICS]
        if bad:
            raise ReportError(f"--metric {bad[0]} is not a metric; choose from {', '.join(SCALAR_METRICS)}.")
        out = args.out or args.sweep_dir / "report"
        sweep = load_sweep(args.sweep_dir, seed_key=args.seed_key, skip=[out])
        paths = write_report(sweep, out, metrics)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if sweep.complete:
        print(results_table(sweep, metrics))
    for r in sweep.left_out:
        print(f"left out {r.name}: {r.status} ({r.reason})")
    print(f"report: {paths['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
