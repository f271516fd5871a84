"""A run directory: claimed by one process at a time, and resolved from ``resume=``.

A run directory holds ``run.json`` (the configuration fingerprint, written before any work; the run's
W&B id, kept across resumes; the digest of its dataset's ``meta/``, which a resume's data.root must match),
``config.resolved.yaml``, ``checkpoints/`` (``state.json`` pointing at the newest complete checkpoint)
and the results. While a process writes it, it holds an exclusive ``flock`` on ``<run>/.lock``; the
kernel drops the lock when the process dies (even by SIGKILL), so a stale lock never blocks a resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cl_vla.config.fingerprint import check_resume_config, config_fingerprint
from cl_vla.data.identity import dataset_identity
from cl_vla.tracking.log_continuity import LogContinuation, new_wandb_id
from cl_vla.training.checkpointing import (
    STATE_FILE,
    CheckpointError,
    RunState,
    atomic_write_bytes,
    atomic_write_json,
    read_checkpoint,
    remove_stale_temporaries,
)

RUN_FILE = "run.json"
LOCK_FILE = ".lock"


def is_first_process() -> bool:
    """Whether the launcher made this process global rank 0 (true when not distributed). Read from the
    launchers' environment, since it is needed before any process group exists: when the run directory
    is claimed."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    return os.environ.get("LOCAL_RANK", "0") in ("", "0") and os.environ.get("NODE_RANK", "0") in ("", "0")


class RunLock:
    """An exclusive, non-blocking claim on a run directory for the life of this process's run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._f: IO[str] | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115  (held open until release)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise CheckpointError(
                f"Run directory {str(self.path.parent)!r} is being written by another cl_vla process "
                f"({holder}); wait for it to end or stop it, then resume."
            ) from None
        except OSError as e:  # a file system without locks (some Lustre/NFS/FUSE mounts): run unlocked
            f.close()
            warnings.warn(
                f"{self.path.parent} is on a file system without flock ({e.strerror}); the run directory "
                "is not protected against a second process writing it.",
                stacklevel=2,
            )
            return self
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None


@dataclass
class ResumePoint:
    """Where a resumed run continues: a verified checkpoint, or the beginning when it had none yet."""

    run_dir: Path
    ckpt: Path | None = None  # None: the run stopped before its first checkpoint
    payload: dict | None = None  # the checkpoint, verified and loaded once
    state: RunState | None = None
    fingerprint: dict[str, Any] | None = None


def run_dir_of(resume: str) -> Path:
    """The run directory ``resume`` names (a run directory, or a checkpoint inside its checkpoints/)."""
    p = Path(resume).expanduser()
    return p.parent.parent if p.is_file() else p


def resolve_resume(resume: str) -> ResumePoint:
    """``resume`` = a run directory or one of its ``.ckpt`` files -> the point to continue from."""
    p = Path(resume).expanduser()
    if p.is_file():
        if p.suffix != ".ckpt":
            raise CheckpointError(f"resume={resume!r} is a file but not a .ckpt checkpoint of cl_vla.")
        return _from_checkpoint(p.parent.parent, p)
    if not p.is_dir():
        raise CheckpointError(f"resume={resume!r} does not exist; give a run directory or a .ckpt file.")
    state_file = p / "checkpoints" / STATE_FILE
    if state_file.is_file():
        try:
            pointer = json.loads(state_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{state_file} is corrupt ({e.msg}); resume from one of its .ckpt files instead."
            ) from e
        if not isinstance(pointer, dict) or not isinstance(pointer.get("checkpoint"), str):
            raise CheckpointError(
                f"{state_file} names no checkpoint; resume from one of its .ckpt files instead."
            )
        return _from_checkpoint(p, p / "checkpoints" / pointer["checkpoint"])
    if (p / RUN_FILE).is_file():
        # Killed before its first checkpoint: nothing was decided that a restart would decide otherwise.
        return ResumePoint(run_dir=p, fingerprint=json.loads((p / RUN_FILE).read_text())["fingerprint"])
    raise CheckpointError(
        f"resume={resume!r} is not a cl_vla run directory (it has neither {RUN_FILE} nor "
        f"checkpoints/{STATE_FILE}); give a run directory or a .ckpt file."
    )


def _from_checkpoint(run_dir: Path, ckpt: Path) -> ResumePoint:
    payload = read_checkpoint(ckpt)
    try:
        state = RunState.from_json(json.loads(payload["cl_vla"]["state"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Checkpoint {str(ckpt)!r} holds no readable cl_vla run state.") from e
    return ResumePoint(run_dir, ckpt=ckpt, payload=payload, state=state, fingerprint=state.fingerprint)


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a folder that already holds one (it would replace its run.json,
    config and, later, checkpoints and results)."""
    # A run.json alone (a run that stopped before its first checkpoint) holds nothing to lose.
    if (run_dir / "checkpoints" / STATE_FILE).is_file() or (run_dir / "results.json").is_file():
        raise CheckpointError(
            f"Output folder {str(run_dir)!r} already holds a cl_vla run; continue it with "
            f"resume={str(run_dir)!r} or choose another folder (hydra.run.dir=<dir>)."
        )


class RunDirGuard(Callback):
    """Hydra callback: refuse a new run into a folder that already holds one *before* Hydra writes that
    folder's ``.hydra/`` record (``on_run_start`` runs first), so a refused command writes nothing:
    a finished run's folder keeps recording its own configuration."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("resume") or config.get("dry_run") or not is_first_process():
            return
        try:
            refuse_existing_run(Path(str(config.hydra.run.dir)))
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


def _rerun_sweep_job(cfg: DictConfig, run_dir: Path) -> bool:
    """A Hydra multirun job whose folder already holds a run (of this sweep: its folder name is its
    swept values, and SweepGuard refused any other sweep in the directory)."""
    from cl_vla.tracking.sweep import current_job_sweep

    return (run_dir / RUN_FILE).is_file() and current_job_sweep(cfg) is not None


def run_finished(handle: RunHandle) -> bool:
    """The run this handle continues had already written its results (nothing left to do)."""
    state = handle.resume.state if handle.resume is not None else None
    done = state is not None and state.task >= state.num_tasks
    return bool(done and (handle.run_dir / "results.json").is_file())


@dataclass
class RunHandle:
    """The run directory this process writes, claimed, with where to start in it."""

    run_dir: Path
    fingerprint: dict[str, Any]
    resume: ResumePoint | None
    lock: RunLock | None
    wandb_id: str | None = None  # the run's W&B id (run.json), the same across every resume

    @property
    def logs(self) -> LogContinuation:
        """Where this process's logs continue the run's (the checkpoint's step and CSV rows, its W&B id)."""
        return LogContinuation.from_checkpoint(self.resume.payload if self.resume else None, self.wandb_id)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def open_run(cfg: DictConfig, claim: bool = True) -> RunHandle:
    """Check a resume against the run's fingerprint, then (``claim``, rank 0) lock the run directory,
    clear what a killed writer left and record the fingerprint. Cheap: runs before any data is read or
    any model is built; a dry run only checks."""
    fingerprint = config_fingerprint(cfg)
    point = resolve_resume(cfg.resume) if cfg.resume else None
    if point is not None and point.fingerprint is not None:
        check_resume_config(point.fingerprint, cfg, cfg.resume)
    if point is not None:
        check_resume_dataset(point.run_dir, cfg)
    if not claim:
        return RunHandle(
            run_dir=point.run_dir if point else Path("."), fingerprint=fingerprint, resume=point, lock=None
        )
    run_dir = point.run_dir if point else Path(cfg.output_dir)
    if point is None and _rerun_sweep_job(cfg, run_dir):
        # The same sweep launched again continues each job where it stopped (its own folder, its own
        # fingerprint): a long sweep is finished over several stretches by one command.
        point = resolve_resume(str(run_dir))
        if point.fingerprint is not None:
            check_resume_config(point.fingerprint, cfg, run_dir)
    if point is None and is_first_process():
        refuse_existing_run(run_dir)
    try:
        lock = RunLock(run_dir).acquire() if is_first_process() else None
    except OSError as e:
        raise _unwritable(run_dir, e, resumed=point is not None) from None
    wandb_id = _recorded_wandb_id(run_dir) if point is not None else None
    try:
        if lock is not None:
            for folder in (run_dir, run_dir / "checkpoints", run_dir / "logs"):
                remove_stale_temporaries(folder)
            if point is None or point.ckpt is None:
                # A run (re)started from the beginning keeps its W&B id, so W&B shows one run.
                wandb_id = wandb_id or new_wandb_id()
                atomic_write_json(run_dir / RUN_FILE, {"fingerprint": fingerprint, "wandb_id": wandb_id})
                text = OmegaConf.to_yaml(cfg, resolve=True)
                atomic_write_bytes(run_dir / "config.resolved.yaml", text.encode())
            elif wandb_id is None:
                # A run from before W&B ids were recorded: from now on its resumes continue one W&B run.
                wandb_id = new_wandb_id()
                record = _run_record(run_dir)
                atomic_write_json(run_dir / RUN_FILE, {**record, "wandb_id": wandb_id})
    except BaseException as e:
        if lock is not None:
            lock.release()
        if isinstance(e, OSError):
            raise _unwritable(run_dir, e, resumed=point is not None) from None
        raise
    return RunHandle(run_dir=run_dir, fingerprint=fingerprint, resume=point, lock=lock, wandb_id=wandb_id)


def _unwritable(run_dir: Path, e: OSError, resumed: bool) -> CheckpointError:
    """A run directory this process cannot write (read-only, full, another user's): one sentence."""
    instead = "resume a writable copy of it" if resumed else "choose another folder (hydra.run.dir=<dir>)"
    return CheckpointError(
        f"Run directory {str(run_dir)!r} cannot be written ({e.strerror or e}); "
        f"make it writable or {instead}."
    )


def _dataset_root(cfg: DictConfig) -> Path | None:
    """The one local dataset folder of the run (None: a hub dataset, or one folder per task)."""
    from cl_vla.data.cross_sequence import is_cross_dataset

    if cfg.data.root is None or is_cross_dataset(cfg.task_sequence):
        return None
    return Path(str(cfg.data.root)).expanduser()


def record_dataset(run_dir: Path, cfg: DictConfig) -> None:
    """Add the identity of the run's dataset to run.json (a run that starts: its dataset now exists)."""
    root = _dataset_root(cfg)
    identity = dataset_identity(root) if root is not None else None
    if identity is not None:
        atomic_write_json(run_dir / RUN_FILE, {**_run_record(run_dir), "dataset": identity})


def check_resume_dataset(run_dir: Path, cfg: DictConfig) -> None:
    """data.root may move on resume, but only to a copy of the run's dataset: another dataset there is
    refused before anything reads or (data=synthetic) rewrites it. A folder without a dataset is left
    to the data step (a synthetic dataset is written there again, the same)."""
    recorded = _run_record(run_dir).get("dataset")
    root = _dataset_root(cfg)
    if not isinstance(recorded, str) or root is None:
        return
    found = dataset_identity(root)
    if found is not None and found != recorded:
        raise CheckpointError(
            f"data.root={str(root)!r} holds another dataset than the one run {str(run_dir)!r} was trained "
            "on (its meta/ differs); a resume may move data.root only to a copy of that dataset, or, with "
            "data=synthetic, to an empty folder where it is written again."
        )


def _run_record(run_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _recorded_wandb_id(run_dir: Path) -> str | None:
    wid = _run_record(run_dir).get("wandb_id")
    return wid if isinstance(wid, str) and wid else None
