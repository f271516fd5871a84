"""One log across any number of resumes: the CSV and TensorBoard logs and the W&B run continue where the
checkpoint a run resumes from left them.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` whenever its folder is not empty, so every resume (and
every resume refused after the loggers were built) lost the rows of the earlier tasks. Here the file is
never deleted: every row is written as it is logged, a checkpoint records how many rows were on disk
when it was written (:func:`log_marks`), and the resumed run keeps those rows (plus the one row of the
checkpoint's own step that Lightning logs just after it), drops the later ones (they are logged again,
the same, since a resume is exact) and appends.
The rewrite waits for the resumed run's first save, so a command that stops before logging anything
leaves the file as it was.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

#: The key of a checkpoint's ``cl_vla`` block that holds :func:`log_marks`.
LOG_MARKS_KEY = "logs"


def new_wandb_id() -> str:
    """A W&B run id as wandb makes them (8 characters of [a-z0-9]); chosen when a run starts and kept in
    its run directory so every resume logs into the same W&B run."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


@dataclass(frozen=True)
class LogContinuation:
    """Where a run's logs continue.

    ``step``: the global step of the checkpoint resumed from (0 when the run starts, or starts again, from
    the beginning); ``csv_rows``: the CSV rows on disk when that checkpoint was written (``None`` for a
    checkpoint that did not record it: then rows are kept by step alone); ``wandb_id``: the run's W&B id.
    """

    wandb_id: str | None = None
    step: int = 0
    csv_rows: int | None = 0

    @classmethod
    def from_checkpoint(cls, payload: dict | None, wandb_id: str | None) -> LogContinuation:
        if payload is None:
            return cls(wandb_id=wandb_id)
        marks = json.loads(payload.get("cl_vla", {}).get(LOG_MARKS_KEY, "{}"))
        return cls(wandb_id=wandb_id, step=int(payload.get("global_step", 0)), csv_rows=marks.get("csv_rows"))


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv``: the rows the checkpoint
    holds are kept, later ones dropped, at the first save."""

    def __init__(self, log_dir: str, keep: LogContinuation) -> None:
        self._keep: LogContinuation | None = keep
        self.rows_on_disk = 0
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes the file here; we keep it (see :meth:`_continue_file`)."""

    def _continue_file(self, keep: LogContinuation) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
        if not header:  # an empty file (killed as it was created): start it afresh
            path.unlink()
            return
        kept = rows[: keep.csv_rows or 0]
        # Rows written after the checkpoint are kept only when they describe steps it holds: Lightning logs
        # step k's training metrics under step k - 1, just after on_train_batch_end wrote the checkpoint.
        kept += [r for r in rows[len(kept) :] if (s := _step(r)) is not None and s < keep.step]
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")  # a mangled row's excess
            writer.writeheader()
            writer.writerows(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a kill mid-rewrite leaves the old file, never a half one
        self.metrics_keys = sorted(header)
        self.rows_on_disk = len(kept)

    def commit(self) -> None:
        """Continue the file (once), then write the rows logged so far."""
        if self._keep is not None:
            self._continue_file(self._keep)
            self._keep = None
        n = len(self.metrics)
        super().save()
        self.rows_on_disk += n

    def save(self) -> None:
        if self.metrics:  # nothing logged yet: the file stays as it was
            self.commit()


def _step(row: dict[str, Any]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None  # a row cut short by a kill


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` continues across resumes (see the module docstring)."""

    def __init__(self, save_dir: str, name: str, keep: LogContinuation) -> None:
        # Every row goes to disk as it is logged (a row every log_every_n_steps: cheap), so a kill loses
        # none, not even the row Lightning logs just after a checkpoint for the step that checkpoint holds.
        super().__init__(save_dir=save_dir, name=name, version="", flush_logs_every_n_steps=1)
        self._keep = keep

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:  # type: ignore[override]
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir, keep=self._keep)
        return self._experiment  # type: ignore[return-value]


def log_marks(loggers: list[Logger]) -> dict[str, int]:
    """Flush the CSV log and say how many rows it holds: what a checkpoint records so its resume keeps
    exactly those rows."""
    marks: dict[str, int] = {}
    for lg in loggers:
        writer = lg.experiment if isinstance(lg, ContinuingCSVLogger) else None
        if isinstance(writer, _ContinuingWriter):  # rank 0 only: other ranks hold a dummy
            writer.commit()
            marks["csv_rows"] = writer.rows_on_disk
    return marks
