"""Lightning loggers (W&B, CSV, TensorBoard) and what the loop sends them at task boundaries."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from cl_vla.tracking.log_continuity import ContinuingCSVLogger, LogContinuation


def build_loggers(
    cfg: DictConfig, run_dir: Path, run_name: str, keep: LogContinuation | None = None
) -> list[Logger]:
    """The configured loggers, continuing where ``keep`` says (a resume): the CSV file keeps the rows
    the checkpoint holds, TensorBoard hides the events after its step, W&B resumes the run's own id."""
    keep = keep or LogContinuation()
    loggers: list[Logger] = []
    lc = cfg.logger
    if lc.wandb.enabled and lc.wandb.mode != "disabled":
        from cl_vla.tracking.sweep import current_job_sweep

        os.environ.setdefault("WANDB_SILENT", "true")
        config = OmegaConf.to_container(cfg, resolve=True)
        # In a multirun, the sweep is the W&B group and the swept values are tags and config keys
        # (`sweep.swept.<key>`), so runs tables and parallel coordinates need no manual setup.
        sweep = current_job_sweep(cfg)
        if sweep is not None:
            config["sweep"] = sweep.config()
        group = lc.wandb.group or cfg.experiment.group or (sweep.group if sweep else cfg.experiment.name)
        loggers.append(
            WandbLogger(
                project=lc.wandb.project,
                entity=lc.wandb.entity,
                group=group,
                name=run_name,
                tags=[*lc.wandb.tags, *(sweep.tags if sweep else [])],
                mode=lc.wandb.mode,
                save_dir=str(run_dir),
                config=config,
                # A fresh run per job, so Hydra multirun jobs never merge into one W&B run.
                reinit="finish_previous",
                # The id saved in the run directory: every resume continues the same W&B run.
                id=keep.wandb_id,
                resume="allow" if keep.wandb_id else None,
            )
        )
    if lc.csv:
        loggers.append(ContinuingCSVLogger(save_dir=str(run_dir), name="logs", keep=keep))
    if lc.tensorboard:
        # TensorBoard hides earlier events at or after purge_step; events at the checkpoint's own step
        # are kept (a task's R row is logged there before its checkpoint is written).
        purge = keep.step + 1 if keep.step > 0 else 0
        loggers.append(
            TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", purge_step=purge)
        )
    from cl_vla.config.instantiate import instantiate_named

    return [*loggers, *instantiate_named(lc.extra, Logger, "logger.extra")]


def wandb_run(loggers: Sequence[Logger]) -> Any | None:
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            return lg.experiment
    return None


def log_row(
    loggers: Sequence[Logger], task: int, row: Sequence[float], step: int, prefix: str = "eval"
) -> None:
    metrics = {f"{prefix}/task_{j:02d}": float(v) for j, v in enumerate(row) if np.isfinite(v)}
    seen = [v for v in row[: task + 1] if np.isfinite(v)]
    if seen:
        metrics[f"{prefix}/avg_seen"] = float(np.mean(seen))
    metrics[f"{prefix}/after_task"] = float(task)
    for lg in loggers:
        lg.log_metrics(metrics, step=step)


def log_final(
    loggers: Sequence[Logger],
    R: np.ndarray,
    task_names: Sequence[str],
    metrics: dict[str, Any],
    figure: Any,
) -> None:
    """The final matrix as a W&B table and heatmap, and the CL metrics as the run summary."""
    run = wandb_run(loggers)
    if run is None:
        return
    import wandb

    columns = ["after_task", *[f"{j}: {n[:40]}" for j, n in enumerate(task_names)]]
    rows = [[i, *[None if not np.isfinite(v) else float(v) for v in R[i]]] for i in range(len(R))]
    run.log({"cl/R_matrix": wandb.Table(columns=columns, data=rows), "cl/R_heatmap": wandb.Image(figure)})
    for k, v in metrics.items():
        if isinstance(v, int | float) and v is not None:
            run.summary[f"cl/{k}"] = v


class TaskProgressBar(RichProgressBar):
    """Rich progress bar that says which task of the sequence is training."""

    def __init__(self, num_tasks: int, task_names: Sequence[str]) -> None:
        super().__init__(leave=True)
        self.num_tasks, self.task_names = num_tasks, list(task_names)
        self.task = 0

    def _get_train_description(self, current_epoch: int) -> str:
        name = self.task_names[self.task]
        return f"task {self.task + 1}/{self.num_tasks}: {name[:40]}"
