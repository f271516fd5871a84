"""Atomic checkpoints and the run state that lets an interrupted run continue exactly.

A checkpoint is Lightning's (model, optimizer, loop progress) plus ``checkpoint["cl_vla"]``: the loop
position and R matrix so far, the algorithm's full state, the normalization statistics in use and the
RNG states. It is loaded with ``weights_only=True``: everything in it is tensors and plain containers.
``checkpoints/state.json`` points at the newest complete checkpoint; it is replaced only after that
checkpoint is fully on disk, so a crash never leaves it pointing at a partial file.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cl_vla.errors import CLVLAError

STATE_FILE = "state.json"


class CheckpointError(CLVLAError):
    """A checkpoint to resume from is missing, corrupt, or from a different run."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file and renames it, so a kill mid-write leaves the old file intact."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


@dataclass
class RunState:
    """Where the continual loop is and what it has measured; JSON in every checkpoint."""

    num_tasks: int
    task_names: list[str]
    fingerprint: dict[str, Any]
    task: int = 0  # position of the task being trained (== num_tasks when finished)
    step_in_task: int = 0  # optimizer steps completed in that task
    R: list[list[float | None]] = field(default_factory=list)
    baseline: list[float | None] | None = None
    within_task: list[list[float]] = field(default_factory=list)
    checkpoint: str | None = None
    finished: bool = False
    train_seconds: list[float] = field(default_factory=list)  # per task, fit wall time (resumes add up)
    eval_seconds: list[float] = field(default_factory=list)  # per task, evaluation wall time

    def __post_init__(self) -> None:
        if not self.R:
            self.R = [[None] * self.num_tasks for _ in range(self.num_tasks)]
        if not self.within_task:
            self.within_task = [[] for _ in range(self.num_tasks)]
        self.train_seconds = self.train_seconds or [0.0] * self.num_tasks
        self.eval_seconds = self.eval_seconds or [0.0] * self.num_tasks

    def matrix(self) -> np.ndarray:
        return np.array([[np.nan if v is None else v for v in row] for row in self.R], dtype=float)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RunState:
        return cls(**d)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def resolve_resume(resume: str) -> tuple[Path, Path, RunState]:
    """``(run_dir, checkpoint, state)`` for ``resume`` = a run directory or a checkpoint file."""
    p = Path(resume).expanduser()
    if p.is_file():
        run_dir = p.parent.parent
        ckpt = p
        state = load_checkpoint_state(ckpt)
        return run_dir, ckpt, state
    state_file = p / "checkpoints" / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(
            f"resume={resume!r} has no checkpoints/{STATE_FILE}; "
            "give a run directory of cl_vla or a .ckpt file."
        )
    try:
        pointer = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file} is corrupt ({e.msg}); resume from a .ckpt file instead.") from e
    ckpt = p / "checkpoints" / pointer["checkpoint"]
    return p, ckpt, load_checkpoint_state(ckpt)


def load_checkpoint_state(ckpt: Path) -> RunState:
    if not ckpt.is_file():
        raise CheckpointError(f"Checkpoint {str(ckpt)!r} does not exist.")
    try:
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
        return RunState.from_json(json.loads(payload["cl_vla"]["state"]))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint {str(ckpt)!r} is corrupt or not a cl_vla checkpoint ({type(e).__name__})."
        ) from e


def check_fingerprint(saved: dict, current: dict, ckpt: Path) -> None:
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"Checkpoint {ckpt.name} was written with {key}={saved.get(key)!r} but this run has "
                f"{key}={current.get(key)!r}; resume with the original configuration."
            )
