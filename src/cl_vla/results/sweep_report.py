"""Compare the runs of one Hydra sweep, from disk only (no network).

    python -m cl_vla.results.sweep_report multirun/default/2026-01-01_12-00-00 [--out DIR] [--metric acc ...]

Reads every job directory of the sweep (``results.json`` for the numbers, ``.hydra/overrides.yaml`` for
the swept values), groups the complete runs by their swept values except the seed, and writes into
``--out`` (default ``<sweep dir>/report``):

* ``report.md``: the table of each metric's mean ± sample standard deviation over seeds, one row per
  setting; every run with its status; the runs left out (failed, incomplete, foreign) and why;
* ``metrics.png``: each metric against the swept value, error bars = std over seeds, dots = seeds;
* ``r_matrices.png``: the seed-averaged R matrix of each setting, side by side on one colour scale;
* ``report.json``: the same numbers for scripts.

The sweep's swept keys come from ``sweep.json`` (written at launch by
:class:`cl_vla.tracking.sweep.SweepGuard`), else from ``multirun.yaml``, else from what differs
between the runs. A directory whose runs do not share one base configuration (two sweeps written into
one directory) is refused with one sentence. Reading the sweep is :mod:`cl_vla.results.sweep_runs`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cl_vla.evaluation.metrics import LEVEL_METRICS, SCALAR_METRICS
from cl_vla.results.plots import new_figure, score_colormap, score_range, short_task_label
from cl_vla.results.run_files import METRIC_LABELS
from cl_vla.results.sweep_runs import REPORT_TAG, Group, ReportError, Sweep, as_number, load_sweep
from cl_vla.results.tables import markdown_table

DEFAULT_METRICS = ("acc", "bwt", "forgetting", "fwt")
REPORT_MD = "report.md"
_LOWER_IS_BETTER = frozenset({"forgetting", "max_forgetting", "libero_nbt", "libero_nbt_code"})


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


def results_table(sweep: Sweep, metrics: Sequence[str]) -> str:
    """The Markdown table: one row per setting, each metric as mean ± std over seeds."""
    hib = _higher_is_better(sweep)
    head = [*sweep.setting_keys, f"runs ({sweep.seed_key})"]
    head += [f"{_label(m)} {_direction(m, hib)}" for m in metrics]
    rows = []
    for g in sweep.groups():
        seeds = ", ".join(r.seed(sweep.seed_key) for r in g.runs)
        row = [v for _, v in g.values] + [f"{len(g.runs)} ({seeds})"]
        rows.append(row + [_fmt(*g.stats(m)) for m in metrics])
    return markdown_table(head, rows, right=range(len(head) - len(metrics), len(head)))


def _higher_is_better(sweep: Sweep) -> bool:
    return bool(sweep.complete[0].results["higher_is_better"]) if sweep.complete else True


def _runs_table(sweep: Sweep, metrics: Sequence[str]) -> str:
    keys = list(sweep.spec.swept)
    head = ["run", "status", *keys, *(_label(m) for m in metrics), "note"]
    rows = []
    for r in sweep.runs:
        vals = [r.swept.get(k, "") for k in keys]
        ms = [f"{v:.4f}" if (v := r.metric(m)) is not None else "" for m in metrics]
        rows.append([f"`{r.name}`", r.status, *vals, *ms, r.reason])
    return markdown_table(head, rows)


def metrics_figure(sweep: Sweep, metrics: Sequence[str]):
    """Each metric against the swept value (mean ± std over seeds, seeds as dots); None if nothing varies."""
    groups = sweep.groups()
    keys = sweep.setting_keys
    if not groups or not keys:
        return None
    numeric = [k for k in keys if all(as_number(dict(g.values)[k]) is not None for g in groups)]
    x_key = numeric[0] if numeric else None
    series: dict[str, list[Group]] = {}
    for g in groups:
        rest = ", ".join(f"{k}={v}" for k, v in g.values if k != x_key)
        series.setdefault(rest, []).append(g)
    categories = [g.label for g in groups]
    hib = _higher_is_better(sweep)
    fig = new_figure(4.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        for s_label, gs in series.items():
            xs, means, errs, dots_x, dots_y = [], [], [], [], []
            for g in gs:
                mean, std, _ = g.stats(m)
                if mean is None:
                    continue
                x = as_number(dict(g.values)[x_key]) if x_key else categories.index(g.label)
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
    groups = [(g, m) for g in sweep.groups() if (m := g.mean_matrix()) is not None]
    if not groups:
        return None
    hib = _higher_is_better(sweep)
    vmin, vmax = score_range(np.concatenate([m.ravel() for _, m in groups]), hib)
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    T = max(m.shape[0] for _, m in groups)
    cell = 0.5 if T <= 10 else 0.28
    fig = new_figure(cols * (2.0 + T * cell) + 1.8, rows * (1.8 + T * cell))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    cmap = score_colormap(hib)
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
    (out / REPORT_TAG).write_text("written by python -m cl_vla.results.sweep_report\n")
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
        prog="python -m cl_vla.results.sweep_report",
        description="Tables and plots comparing the runs of one Hydra sweep.",
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
