"""The end of a run: metrics from R, ``results.json`` and the plots on disk, the summary in the
terminal, and the final matrix and metrics in W&B."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from rich.console import Console

from cl_vla.algorithms.base import CLAlgorithm
from cl_vla.evaluation.metrics import compute_metrics
from cl_vla.results.plots import heatmap_figure
from cl_vla.results.run_files import format_matrix_table, print_summary, write_results
from cl_vla.tracking.loggers import log_final, wandb_run

if TYPE_CHECKING:
    from cl_vla.training.continual_run import ContinualRun


def finish_run(run: ContinualRun, console: Console) -> float | None:
    st = run.state
    R = st.matrix()
    within = [w for w in st.within_task] if any(len(w) > 1 for w in st.within_task) else None
    sim = run.cfg.eval.type == "sim"  # R: success rate (higher is better); else held-out loss (lower)
    name, label = ("success_rate", "success rate") if sim else ("heldout_action_loss", "held-out action loss")
    metrics = compute_metrics(R, higher_is_better=sim, baseline=st.baseline, within_task=within)
    second: dict[str, Any] = {}
    if run.second is not None:
        loss = np.array([[np.nan if v is None else v for v in row] for row in run.second["R"]], dtype=float)
        second = {
            "heldout_action_loss": {
                "matrix": loss,
                "baseline": run.second["baseline"],
                "higher_is_better": False,
                "metrics": compute_metrics(loss, higher_is_better=False, baseline=run.second["baseline"]),
            }
        }
    if run.sim is not None:
        second["sim"] = run.sim.stats.to_json()
        run.sim.close()
    # Every rank: under FSDP reading the algorithm's state gathers its shards (a collective).
    state_bytes = _state_bytes(run.algorithm)
    if run.trainer.is_global_zero:
        write_results(
            run.run_dir,
            R,
            st.task_names,
            metrics=metrics,
            higher_is_better=sim,
            metric_name=name,
            extra={
                **second,
                "algorithm": run.cfg.algorithm.get("name"),
                "model": run.cfg.model.type,
                "seed": int(run.cfg.seed),
                "baseline": st.baseline,
                "steps_per_task": run.S,
                "global_step": run.trainer.global_step,
                "train_seconds": st.train_seconds,
                "eval_seconds": st.eval_seconds,
                "algorithm_state_bytes": state_bytes,
            },
        )
        print_summary(console, R, st.task_names, metrics, higher_is_better=sim, metric_name=label)
        fig = heatmap_figure(R, st.task_names, higher_is_better=sim, metric_name=label)
        log_final(run.loggers, R, st.task_names, metrics, fig)
        if "heldout_action_loss" in second:
            _report_second(run, console, second["heldout_action_loss"])
        plt.close(fig)
    for lg in run.loggers:
        lg.finalize("success")
    import wandb

    if wandb.run is not None:
        wandb.finish()
    if run.trainer.is_global_zero:
        # Last line of a run: where its results.json, R matrix, plots and checkpoints are.
        console.print(f"run directory: {run.run_dir}", soft_wrap=True, highlight=False)
    acc = metrics.get("acc")
    return float(acc) if acc is not None else None


def _report_second(run: ContinualRun, console: Console, second: dict[str, Any]) -> None:
    """eval=sim: the held-out loss matrix, printed after the success matrix and logged to W&B."""
    loss, names = second["matrix"], run.state.task_names
    console.print(
        format_matrix_table(
            loss, names, second["metrics"], higher_is_better=False, metric_name="held-out action loss"
        )
    )
    wb = wandb_run(run.loggers)
    if wb is not None:
        import wandb

        cols = ["after_task", *[f"{j}: {n[:40]}" for j, n in enumerate(names)]]
        rows = [[i, *[None if not np.isfinite(v) else float(v) for v in loss[i]]] for i in range(len(loss))]
        wb.log({"cl/heldout_R_matrix": wandb.Table(columns=cols, data=rows)})
        for k, v in second["metrics"].items():
            if isinstance(v, int | float):
                wb.summary[f"cl/heldout/{k}"] = v
        stats = run.sim.stats.to_json() if run.sim is not None else {}
        for k in ("env_steps", "seconds", "env_steps_per_s"):
            if stats.get(k) is not None:
                wb.summary[f"sim/{k}"] = stats[k]


def _state_bytes(algorithm: CLAlgorithm) -> int:
    """Approximate bytes the algorithm keeps (its memory footprint beyond the policy)."""
    memory = getattr(algorithm, "memory_bytes", None)
    if memory is not None:
        return int(memory())
    total = 0
    stack: list[Any] = [algorithm.state_dict()]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, list | tuple):
            stack += list(x)
    return total
