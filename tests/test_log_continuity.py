"""Logs continue across resumes (the kill-and-resume run itself: tests/test_loop_e2e.py, SIGKILL test).

A resume keeps the CSV rows its checkpoint holds and replaces the later ones; a command that stops
before logging leaves the file as it was; TensorBoard hides events after the checkpoint's step; W&B
resumes the run's saved id.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from cl_vla.tracking.log_continuity import ContinuingCSVLogger, LogContinuation, log_marks, new_wandb_id
from cl_vla.tracking.loggers import build_loggers
from conftest import compose_config

HEADER = ["epoch", "eval/task_00", "step", "train/loss"]


def _write_log(run_dir: Path, steps: list[int]) -> Path:
    path = run_dir / "logs" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER)
        w.writeheader()
        w.writerows({"epoch": 0, "step": s, "train/loss": 1.0 / (s + 1)} for s in steps)
    return path


def _steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_resume_keeps_rows_the_checkpoint_holds_and_replaces_later_ones(tmp_path):
    # A checkpoint at step 8 written with 2 rows on disk (steps 3 and 4, say an R row at 4);
    # the row of step 7 came just after it (Lightning logs step k's row under k - 1), then 11 and 15.
    path = _write_log(tmp_path, [3, 4, 7, 11, 15])
    before = hashlib.sha256(path.read_bytes()).digest()
    logger = ContinuingCSVLogger(str(tmp_path), "logs", LogContinuation(step=8, csv_rows=2))
    logger.log_hyperparams({"lr": 1e-3})  # no metric row yet: the file is untouched
    assert hashlib.sha256(path.read_bytes()).digest() == before

    logger.log_metrics({"train/loss": 0.5, "epoch": 0}, step=11)
    assert _steps(path) == [3, 4, 7, 11]
    logger.log_metrics({"eval/task_00": 0.25}, step=12)
    assert _steps(path) == [3, 4, 7, 11, 12]
    assert log_marks([logger]) == {"csv_rows": 5}
    with open(path, newline="") as f:
        assert sorted(csv.DictReader(f).fieldnames or []) == HEADER  # the old columns stay


def test_run_started_again_from_the_beginning_replaces_every_row(tmp_path):
    path = _write_log(tmp_path, [3, 7])
    logger = ContinuingCSVLogger(str(tmp_path), "logs", LogContinuation())
    logger.log_metrics({"train/loss": 0.5}, step=3)
    assert _steps(path) == [3]


def test_checkpoint_without_a_row_count_keeps_rows_by_step(tmp_path):
    path = _write_log(tmp_path, [3, 7, 11])
    logger = ContinuingCSVLogger(str(tmp_path), "logs", LogContinuation(step=8, csv_rows=None))
    logger.log_metrics({"train/loss": 0.5}, step=11)
    assert _steps(path) == [3, 7, 11]


def test_loggers_resume_the_saved_wandb_id_and_purge_tensorboard_after_the_step(tmp_path):
    cfg = compose_config("logger=default", "logger.tensorboard=true", f"output_dir={tmp_path}")
    wid = new_wandb_id()
    assert len(wid) == 8 and wid.isalnum() and wid.islower()
    loggers = build_loggers(cfg, tmp_path, "run", LogContinuation(wandb_id=wid, step=48, csv_rows=3))
    (wb,) = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    assert wb._wandb_init["id"] == wid and wb._wandb_init["resume"] == "allow"
    (tb,) = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
    assert tb._kwargs["purge_step"] == 49  # the checkpoint's own step (its R row) stays
    assert any(isinstance(lg, ContinuingCSVLogger) for lg in loggers)


def test_empty_log_left_by_a_kill_is_started_afresh(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("")
    logger = ContinuingCSVLogger(str(tmp_path), "logs", LogContinuation(step=8, csv_rows=2))
    logger.log_metrics({"train/loss": 0.5}, step=11)
    assert _steps(path) == [11]


def test_tensorboard_resume_hides_the_events_after_the_checkpoint(tmp_path):
    """Read back with TensorBoard's own loader: the killed process's events after the checkpoint's step
    are purged, those up to it stay, the resumed process's follow."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_config("logger=none", "logger.tensorboard=true", f"output_dir={tmp_path}")

    def log(keep: LogContinuation, steps: range, value: float) -> None:
        (tb,) = [lg for lg in build_loggers(cfg, tmp_path, "run", keep) if isinstance(lg, TensorBoardLogger)]
        for s in steps:
            tb.log_metrics({"train/loss": value}, step=s)
        tb.finalize("success")

    log(LogContinuation(), range(10), 1.0)  # killed after step 9; its checkpoint is at step 5
    log(LogContinuation(step=5), range(5, 10), 2.0)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert {s for s, _ in events} == set(range(10))
    assert [v for s, v in events if s > 5] == [2.0] * 4 and [v for s, v in events if s < 5] == [1.0] * 5
