"""Result files, heatmap and terminal summary."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from rich.console import Console

from cl_vla.evaluation.metrics import CLMetrics, compute_metrics
from cl_vla.results.plots import heatmap_figure, short_task_label
from cl_vla.results.run_files import (
    format_matrix_table,
    format_metrics_table,
    print_summary,
    read_results,
    write_results,
)

NAMES = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "open the top drawer",
    "put the bowl on the stove",
]


def partial_matrix() -> np.ndarray:
    R = np.array([[0.8, 0.1, 0.0], [0.6, 0.9, 0.2], [np.nan] * 3])
    return R


def write(
    tmp_path: Path, R: np.ndarray, *, higher_is_better: bool = True, **kwargs: object
) -> dict[str, Path]:
    metrics = compute_metrics(R, higher_is_better=higher_is_better)
    return write_results(
        tmp_path,
        R,
        NAMES,
        metrics=metrics,
        higher_is_better=higher_is_better,
        metric_name="success rate" if higher_is_better else "action loss",
        **kwargs,  # type: ignore[arg-type]
    )


def test_short_task_label() -> None:
    assert short_task_label(0, NAMES[0]) == "0: pick up the black..."
    assert short_task_label(1, NAMES[1]) == "1: open the top drawer"
    assert len(short_task_label(12, "x" * 100, max_chars=20)) <= 20
    assert short_task_label(3, "  many   spaces\nhere ") == "3: many spaces here"


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    R = partial_matrix()
    extra = {"seed": np.int64(7), "lr": np.float32(0.5), "out": tmp_path, "tags": ("a", "b")}
    paths = write(tmp_path / "run", R, extra=extra)
    assert set(paths) == {"json", "csv", "png"}
    assert all(p.is_file() and p.parent == tmp_path / "run" for p in paths.values())

    raw = json.loads(paths["json"].read_text())
    assert raw["matrix"][2] == [None, None, None]  # strict JSON: null, not NaN
    assert raw["task_names"] == NAMES and raw["metric_name"] == "success rate"
    assert raw["higher_is_better"] is True
    assert raw["metrics"]["fwt"] is None
    assert raw["extra"] == {"seed": 7, "lr": 0.5, "out": str(tmp_path), "tags": ["a", "b"]}

    data = read_results(tmp_path / "run")
    np.testing.assert_array_equal(data["matrix"], R)  # NaN compares equal here
    assert data["metrics"] == compute_metrics(R)  # JSON floats round-trip exactly


def test_csv_matches_json(tmp_path: Path) -> None:
    R = partial_matrix()
    paths = write(tmp_path, R)
    with paths["csv"].open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["", *NAMES]
    assert [r[0] for r in rows[1:]] == [f"after {n}" for n in NAMES]
    matrix = json.loads(paths["json"].read_text())["matrix"]
    for row, expected in zip(rows[1:], matrix, strict=True):
        assert [None if c == "" else float(c) for c in row[1:]] == expected


def test_png_is_a_png(tmp_path: Path) -> None:
    paths = write(tmp_path, partial_matrix())
    data = paths["png"].read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_loss_results(tmp_path: Path) -> None:
    L = np.array([[0.2, 0.9, 1.0], [0.5, 0.1, 0.8], [0.6, 0.3, 0.15]])
    write(tmp_path, L, higher_is_better=False)
    data = read_results(tmp_path)
    assert data["higher_is_better"] is False and data["metric_name"] == "action loss"
    assert data["metrics"]["bwt"] == pytest.approx(-0.3)


def test_atomic_write_leaves_no_tmp_files_and_overwrites(tmp_path: Path) -> None:
    R = partial_matrix()
    write(tmp_path, R)
    R[2] = [0.5, 0.7, 0.9]
    write(tmp_path, R)  # a run rewrites its results after every task
    assert sorted(os.listdir(tmp_path)) == ["r_matrix.csv", "r_matrix.png", "results.json"]
    assert read_results(tmp_path)["metrics"]["tasks_learned"] == 3
    assert oct(os.stat(tmp_path / "results.json").st_mode & 0o777) == oct(0o644)


def test_failed_write_keeps_old_file_and_no_tmp(tmp_path: Path) -> None:
    R = partial_matrix()
    write(tmp_path, R)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match="extra"):
        write(tmp_path, R, extra={"bad": object()})
    assert (tmp_path / "results.json").read_text() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_write_accepts_cl_metrics(tmp_path: Path) -> None:
    R = partial_matrix()
    write_results(
        tmp_path, R, NAMES, metrics=CLMetrics.from_matrix(R), higher_is_better=True, metric_name="sr"
    )
    assert read_results(tmp_path)["metrics"]["forgetting_per_task"][0] == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_names": NAMES[:2]}, "task_names has 2 entries"),
        ({"task_names": "abc"}, "single string"),
        ({"R": np.zeros((2, 3))}, "square"),
        ({"metric_name": ""}, "metric_name"),
    ],
)
def test_write_rejects_bad_input(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"R": partial_matrix(), "task_names": NAMES, "metric_name": "sr"} | kwargs
    with pytest.raises(ValueError, match=message):
        write_results(
            tmp_path,
            args["R"],
            args["task_names"],
            metrics={},
            higher_is_better=True,
            metric_name=args["metric_name"],
        )


def test_read_results_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no results\.json"):
        read_results(tmp_path)
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="could not be read as JSON"):
        read_results(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_results(tmp_path)
    good = {
        "task_names": ["a"],
        "matrix": [[0.5]],
        "metrics": {},
        "metric_name": "sr",
        "higher_is_better": True,
    }
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "metrics"}))
    with pytest.raises(ValueError, match="'metrics'"):
        read_results(tmp_path)
    path.write_text(json.dumps(good | {"matrix": [[0.5, 0.1]]}))
    with pytest.raises(ValueError, match="invalid result matrix"):
        read_results(tmp_path)
    path.write_text(json.dumps(good | {"task_names": ["a", "b"]}))
    with pytest.raises(ValueError, match="invalid result matrix"):
        read_results(tmp_path)
    path.write_text(json.dumps(good | {"schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version"):
        read_results(tmp_path)
    path.write_text(json.dumps(good))
    assert read_results(tmp_path)["extra"] == {}


def test_heatmap_figure() -> None:
    fig = heatmap_figure(partial_matrix(), NAMES, metric_name="success rate")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xticklabels()[0].get_text() == "0: pick up the black..."
    assert ax.get_yticklabels()[1].get_text() == "after 1: open the top drawer"
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0.80", "0.10", "0.00", "0.60", "0.90", "0.20"])
    # Good is green for both directions: the colormap is reversed for losses.
    up = ax.images[0].get_cmap()
    down = heatmap_figure(partial_matrix(), NAMES, higher_is_better=False).axes[0].images[0].get_cmap()
    assert up(1.0) == down(0.0)


def test_terminal_summary() -> None:
    R = partial_matrix()
    metrics = compute_metrics(R)
    table = format_matrix_table(R, NAMES, metrics)
    assert len(table.columns) == 4 and table.row_count == 3
    assert "ACC 0.750" in str(table.caption) and "BWT -0.200" in str(table.caption)
    # LIBERO FWT/AUC in both conventions, NBT as the paper writes it and as LIBERO's code computes it
    rows = format_metrics_table(metrics)
    assert rows.row_count == 13 and "LIBERO NBT (code)" in str(rows.columns[0]._cells)

    console = Console(record=True, width=120, color_system=None)
    print_summary(console, R, NAMES, metrics)
    text = console.export_text()
    assert "0: pick up the black bowl..." in text
    assert "Forgetting" in text and "n/a" in text and "0.90" in text and "·" in text
