"""Per-run result files and terminal summaries of the result matrix ``R``.

A finished (or interrupted) run writes three files into its run directory:

* ``results.json``: task names, ``R`` as nested lists (``null`` for rows not yet filled), the
  metrics of :mod:`cl_vla.evaluation.metrics`, the metric's name, its direction and free-form ``extra`` info;
* ``r_matrix.csv``: ``R`` with a header row of task names and a first column ``after <task>``;
* ``r_matrix.png``: an annotated heatmap (see :func:`cl_vla.results.plots.heatmap_figure`).

Each file is written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader never sees a half-written file; ``results.json`` is written last, so
its presence means the other two are complete. :func:`read_results` is the reader used by sweep
reports.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import ArrayLike
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cl_vla.evaluation.metrics import LEVEL_METRICS, SCALAR_METRICS, CLMetrics, validate_matrix
from cl_vla.results.plots import check_task_names, heatmap_figure, short_task_label, value_format

RESULTS_JSON = "results.json"
R_MATRIX_CSV = "r_matrix.csv"
R_MATRIX_PNG = "r_matrix.png"
SCHEMA_VERSION = 1

#: Short display names and one-line meanings of the scalar metrics.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "acc": ("ACC", "mean over seen tasks after the last learned task"),
    "acc_all": ("ACC (all)", "mean over all tasks after the last learned task"),
    "learning_accuracy": ("LA", "mean of each task right after learning it"),
    "bwt": ("BWT", "backward transfer; negative = forgetting"),
    "fwt": ("FWT", "forward transfer vs. the initial model; positive = good"),
    "forgetting": ("Forgetting", "mean drop from the best score; positive = bad"),
    "max_forgetting": ("Max forgetting", "largest per-task forgetting"),
    "libero_fwt": ("LIBERO FWT", "mean within-task curve, as recorded (LIBERO paper's formula)"),
    "libero_nbt": ("LIBERO NBT", "negative backward transfer; positive = bad (LIBERO)"),
    "libero_auc": ("LIBERO AUC", "area under the per-task curve (LIBERO paper's formula)"),
    "libero_fwt_code": ("LIBERO FWT (code)", "as LIBERO's learn_one_task: curve held at its best point"),
    "libero_nbt_code": ("LIBERO NBT (code)", "as LIBERO's compute_metric: c_kk from R's diagonal, / K"),
    "libero_auc_code": ("LIBERO AUC (code)", "AUC with LIBERO's code FWT (curve held at its best point)"),
}

_JsonValue = Any


# ---------------------------------------------------------------------------------------- labels


def _metrics_dict(metrics: Mapping[str, Any] | CLMetrics | None) -> dict[str, Any]:
    if metrics is None:
        return {}
    if isinstance(metrics, CLMetrics):
        return metrics.to_dict()
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping or CLMetrics, not {type(metrics).__name__}.")
    return dict(metrics)


# ---------------------------------------------------------------------------------- file writing


def _jsonable(obj: Any, where: str) -> _JsonValue:
    """Plain-Python copy of ``obj`` for strict JSON: NaN/inf become ``None``, numpy becomes Python."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise ValueError(
        f"{where} has a value of type {type(obj).__name__} that cannot be written to JSON; "
        f"convert it to plain Python types first."
    )


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; results are meant to be read by others on shared clusters.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _csv_text(arr: np.ndarray, names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["", *names])
    for i, name in enumerate(names):
        # repr keeps full float precision, so the CSV holds exactly the numbers in the JSON.
        writer.writerow([f"after {name}", *("" if np.isnan(v) else repr(float(v)) for v in arr[i])])
    return buf.getvalue()


def write_results(
    run_dir: str | os.PathLike[str],
    R: ArrayLike,
    task_names: Sequence[str],
    *,
    metrics: Mapping[str, Any] | CLMetrics,
    higher_is_better: bool,
    metric_name: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``r_matrix.csv`` and ``r_matrix.png`` atomically into ``run_dir``.

    ``metrics`` is the output of :func:`cl_vla.evaluation.metrics.compute_metrics` (or a ``CLMetrics``);
    ``extra`` any JSON-able run information (config, seed, timings; numpy values and paths are
    converted). Creates ``run_dir`` if needed; may be called again to overwrite after each task.
    Returns the paths under the keys ``"json"``, ``"csv"`` and ``"png"``.
    """
    arr = validate_matrix(R)
    names = check_task_names(task_names, arr.shape[0])
    if not isinstance(metric_name, str) or not metric_name:
        raise ValueError("metric_name must be a non-empty string.")
    payload = {
        "schema_version": SCHEMA_VERSION,
        "metric_name": metric_name,
        "higher_is_better": bool(higher_is_better),
        "task_names": names,
        "matrix": _jsonable(arr, "R"),
        "metrics": _jsonable(_metrics_dict(metrics), "metrics"),
        "extra": _jsonable(dict(extra or {}), "extra"),
    }
    json_text = json.dumps(payload, indent=2, allow_nan=False) + "\n"

    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "csv": out / R_MATRIX_CSV, "png": out / R_MATRIX_PNG}

    fig = heatmap_figure(arr, names, higher_is_better=higher_is_better, metric_name=metric_name)
    _atomic_write(paths["png"], lambda f: fig.savefig(f, format="png", dpi=110))
    _atomic_write(paths["csv"], lambda f: f.write(_csv_text(arr, names).encode("utf-8")))
    # Last, so that an existing results.json implies the other files are complete.
    _atomic_write(paths["json"], lambda f: f.write(json_text.encode("utf-8")))
    return paths


def read_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``results.json`` from ``run_dir``, checked; ``"matrix"`` comes back as a float array.

    The other keys are as written by :func:`write_results` (``"extra"`` defaults to ``{}``).
    Raises a one-sentence ``ValueError`` if the file is missing, not JSON or malformed.
    """
    path = Path(run_dir) / RESULTS_JSON
    if not path.is_file():
        raise ValueError(f"There is no {RESULTS_JSON} in {run_dir}; the run has not written its results.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} could not be read as JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r}, newer than the supported {SCHEMA_VERSION}.")
    expected = {
        "task_names": list,
        "matrix": list,
        "metrics": dict,
        "metric_name": str,
        "higher_is_better": bool,
    }
    for key, kind in expected.items():
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{path} is missing '{key}' or it is not a JSON {kind.__name__}.")
    try:
        arr = validate_matrix(data["matrix"])
        check_task_names(data["task_names"], arr.shape[0])
    except ValueError as exc:
        raise ValueError(f"{path} holds an invalid result matrix ({str(exc).rstrip('.')}).") from exc
    data["matrix"] = arr
    data.setdefault("extra", {})
    return data


# -------------------------------------------------------------------------------------- terminal


def _format_metric(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:+.3f}" if key not in LEVEL_METRICS else f"{value:.3f}"
    return str(value)


def format_metrics_table(metrics: Mapping[str, Any] | CLMetrics, *, title: str | None = "Metrics") -> Table:
    """Table of the scalar metrics with a one-line meaning each; undefined ones show ``n/a``."""
    values = _metrics_dict(metrics)
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("meaning", style="dim")
    for key in SCALAR_METRICS:
        if key not in values:
            continue
        label, meaning = METRIC_LABELS[key]
        table.add_row(label, _format_metric(key, values[key]), meaning)
    return table


def format_matrix_table(
    R: ArrayLike,
    task_names: Sequence[str],
    metrics: Mapping[str, Any] | CLMetrics | None = None,
    *,
    higher_is_better: bool = True,
    metric_name: str = "success rate",
    title: str | None = None,
    max_label_chars: int = 32,
) -> Table:
    """Rich table of ``R``: one row per "after task i", columns by task index.

    The diagonal is bold, tasks not yet trained on (``j > i``) are dim, unfilled rows show ``·``.
    With ``metrics`` the headline numbers go into the caption.
    """
    arr = validate_matrix(R)
    T = arr.shape[0]
    names = check_task_names(task_names, T)
    direction = "higher" if higher_is_better else "lower"
    table = Table(title=title or f"R matrix: {metric_name} ({direction} is better)", title_justify="left")
    table.add_column("after task \\ task", no_wrap=True)
    for j in range(T):
        table.add_column(str(j), justify="right")
    fmt = value_format(arr, higher_is_better)
    for i in range(T):
        cells: list[Text] = []
        for j in range(T):
            v = arr[i, j]
            if np.isnan(v):
                cells.append(Text("·", style="dim"))
            else:
                style = "bold" if i == j else ("dim" if j > i else "")
                cells.append(Text(format(v, fmt), style=style))
        table.add_row(Text(short_task_label(i, names[i], max_label_chars)), *cells)
    values = _metrics_dict(metrics)
    if values:
        headline = [k for k in ("acc", "bwt", "fwt", "forgetting", "libero_auc") if k in values]
        table.caption = "  ".join(f"{METRIC_LABELS[k][0]} {_format_metric(k, values[k])}" for k in headline)
    return table


def print_summary(
    console: Console,
    R: ArrayLike,
    task_names: Sequence[str],
    metrics: Mapping[str, Any] | CLMetrics,
    *,
    higher_is_better: bool = True,
    metric_name: str = "success rate",
    title: str | None = None,
) -> None:
    """Print the matrix and the metrics to ``console`` (the end-of-run summary)."""
    console.print(
        format_matrix_table(
            R, task_names, metrics, higher_is_better=higher_is_better, metric_name=metric_name, title=title
        )
    )
    console.print(format_metrics_table(metrics))
