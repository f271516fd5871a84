"""The plots of a run and of a sweep share one look: R's colour scale (red bad, green good, reversed
for losses, grey for cells not filled) and figures that live outside pyplot (freed with their last
reference, safe in long runs)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from numpy.typing import ArrayLike

from cl_vla.evaluation.metrics import validate_matrix


def short_task_label(index: int, name: str, max_chars: int = 24) -> str:
    """``"<index>: <name>"`` cut to ``max_chars`` at a word boundary, e.g. ``"0: pick up the black..."``."""
    name = " ".join(str(name).split())
    label = f"{index}: {name}"
    if len(label) <= max_chars:
        return label
    prefix = f"{index}: "
    budget = max(max_chars - len(prefix) - 3, 1)
    cut = name[: budget + 1]
    # Prefer a word boundary unless that would throw away more than half of the room.
    space = cut.rfind(" ")
    cut = cut[:space] if space >= budget // 2 else cut[:budget]
    return prefix + cut.rstrip(" ,;:.-") + "..."


def check_task_names(task_names: Sequence[str], num_tasks: int) -> list[str]:
    if isinstance(task_names, str | bytes):
        raise ValueError("task_names must be a sequence of strings, not a single string.")
    names = list(task_names)
    if len(names) != num_tasks:
        raise ValueError(f"task_names has {len(names)} entries but R has {num_tasks} tasks.")
    if not all(isinstance(n, str) for n in names):
        raise ValueError("task_names must contain only strings.")
    return names


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib ``Figure`` on an Agg canvas, not registered with pyplot."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def score_colormap(higher_is_better: bool) -> Colormap:
    """Red (bad) to green (good) whichever the direction; unfilled cells grey."""
    return matplotlib.colormaps["RdYlGn" if higher_is_better else "RdYlGn_r"].with_extremes(bad="#d9d9d9")


def score_range(values: np.ndarray, higher_is_better: bool) -> tuple[float, float]:
    """The colour scale's limits: 0..1 for success rates (runs comparable by eye), else the data's."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    if higher_is_better and ((finite >= 0) & (finite <= 1)).all():
        return 0.0, 1.0
    vmin, vmax = float(finite.min()), float(finite.max())
    return (vmin - 0.5, vmax + 0.5) if vmin == vmax else (vmin, vmax)


def value_format(arr: np.ndarray, higher_is_better: bool) -> str:
    finite = arr[np.isfinite(arr)]
    # Success rates read best with two decimals; losses span magnitudes, so use significant digits.
    if higher_is_better and ((finite >= 0) & (finite <= 1)).all():
        return ".2f"
    return ".3g"


def heatmap_figure(
    R: ArrayLike,
    task_names: Sequence[str],
    *,
    higher_is_better: bool = True,
    metric_name: str = "success rate",
    title: str | None = None,
    max_label_chars: int = 24,
    annotate: bool | None = None,
) -> Figure:
    """Annotated heatmap of ``R`` as a standalone matplotlib ``Figure`` (Agg canvas, no pyplot).

    Rows are "after task i", columns "task j"; unfilled cells are grey; the diagonal is outlined.
    The colormap runs red (bad) to green (good) and is reversed for losses, so green always means
    good. Values are written in the cells when ``annotate`` (default: for up to 20 tasks).
    Not registered with pyplot, so it is freed with its last reference (safe in long runs); pass it
    to ``wandb.Image`` or call ``savefig``.
    """
    arr = validate_matrix(R)
    T = arr.shape[0]
    names = check_task_names(task_names, T)
    if annotate is None:
        annotate = T <= 20

    cell = 0.8 if T <= 10 else 0.45
    label_room = 0.075 * max_label_chars
    fig = new_figure(2.5 + label_room + T * cell, 1.5 + label_room * 0.7 + T * cell)
    ax = fig.add_subplot()

    cmap = score_colormap(higher_is_better)
    vmin, vmax = score_range(arr, higher_is_better)
    image = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")

    labels = [short_task_label(i, n, max_label_chars) for i, n in enumerate(names)]
    ax.set_xticks(range(T), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(T), [f"after {lbl}" for lbl in labels])
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    for k in range(T):
        ax.add_patch(Rectangle((k - 0.5, k - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.2))

    if annotate:
        fmt = value_format(arr, higher_is_better)
        fontsize = 9 if T <= 10 else 7
        for i in range(T):
            for j in range(T):
                v = arr[i, j]
                if not np.isfinite(v):
                    continue
                r, g, b, _ = cmap(image.norm(v))
                # Pick the text colour by the cell's luminance so numbers stay readable.
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, format(v, fmt), ha="center", va="center", color=color, fontsize=fontsize)

    direction = "higher" if higher_is_better else "lower"
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"{metric_name} ({direction} is better)")
    ax.set_title(title or f"R matrix: {metric_name}")
    return fig
