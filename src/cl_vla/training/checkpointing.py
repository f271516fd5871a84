"""Atomic, digest-checked checkpoints and the run state that lets an interrupted run continue exactly.

A checkpoint is Lightning's (model, optimizer, loop progress) plus ``checkpoint["cl_vla"]``: the loop
position and R matrix so far, the algorithm's full state, the normalization statistics in use and the
RNG states. It is loaded with ``weights_only=True``: everything in it is tensors and plain containers.

Every checkpoint ``X.ckpt`` has a sidecar ``X.ckpt.sha256`` (``sha256sum -c`` format) written with it;
loading verifies it, so a damaged or altered file is refused instead of silently resumed.
``checkpoints/state.json`` points at the newest complete checkpoint; it is replaced only after that
checkpoint is fully on disk, so a crash never leaves it pointing at a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from cl_vla.errors import CLVLAError

STATE_FILE = "state.json"
DIGEST_SUFFIX = ".sha256"


class CheckpointError(CLVLAError):
    """A checkpoint to resume from is missing, corrupt, or from a different run."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX: the directory entry is data of the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``.<name>.tmp<pid>`` files a killed writer left behind; call only while holding the run lock
    (then no other process of this run can be writing them)."""
    removed = []
    for tmp in folder.glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class _HashingWriter:
    """A write-only file object that feeds sha256 while writing, so a checkpoint is hashed as it is
    serialized (no second pass, no in-memory copy of a multi-GB checkpoint)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def digest_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + DIGEST_SUFFIX)


def _write_digests(ckpt: Path, digests: list[str]) -> None:
    text = "".join(f"{d}  {ckpt.name}\n" for d in digests)
    atomic_write_bytes(digest_path(ckpt), text.encode())


def recorded_digests(ckpt: Path) -> list[str] | None:
    """Digests the sidecar accepts for ``ckpt`` (two only while a replacement is being renamed into
    place); ``None`` for a checkpoint written before digests existed."""
    side = digest_path(ckpt)
    if not side.is_file():
        return None
    return [line.split()[0] for line in side.read_text().splitlines() if line.strip()]


def write_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write ``checkpoint`` atomically and durably with its digest.

    Order: data to a temporary file (fsync) -> sidecar lists the new digest and the old one -> rename ->
    sidecar lists the new digest only. A kill at any point leaves ``path`` (old or new) matching a digest
    in its sidecar, so a crash never makes a good checkpoint look damaged.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(checkpoint, writer)
        f.flush()
        os.fsync(f.fileno())
    digest = writer.sha.hexdigest()
    old = (recorded_digests(path) or [])[:1] if path.exists() else []
    _write_digests(path, [digest, *old])
    os.replace(tmp, path)
    fsync_dir(path.parent)
    _write_digests(path, [digest])


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checkpoint(ckpt: Path) -> None:
    """Raise one sentence if ``ckpt`` does not match the digest recorded when it was written."""
    expected = recorded_digests(ckpt)
    if expected is None:
        print(
            f"warning: {ckpt.name} has no {DIGEST_SUFFIX} digest (written by an older cl_vla); "
            "its integrity cannot be checked.",
            file=sys.stderr,
        )
        return
    if file_sha256(ckpt) not in expected:
        others = sorted(p.name for p in ckpt.parent.glob("*.ckpt") if p != ckpt)
        hint = f"; resume from an earlier one ({', '.join(others)})" if others else ""
        raise CheckpointError(
            f"Checkpoint {str(ckpt)!r} does not match the sha256 digest recorded when it was written "
            f"({digest_path(ckpt).name}): it was damaged or altered since{hint}."
        )


def read_checkpoint(ckpt: Path) -> dict:
    """Verify and load a checkpoint (CPU tensors, ``weights_only=True``); one sentence when it can't be."""
    if not ckpt.is_file():
        raise CheckpointError(f"Checkpoint {str(ckpt)!r} does not exist.")
    verify_checkpoint(ckpt)
    try:
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
        if not isinstance(payload["cl_vla"]["state"], str):  # a cl_vla checkpoint has our block
            raise TypeError("no cl_vla run state")
        return payload
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint {str(ckpt)!r} is corrupt or not a cl_vla checkpoint ({type(e).__name__})."
        ) from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O through :func:`write_checkpoint` / :func:`read_checkpoint`.

    A resume verifies and loads its checkpoint once, before training (it needs the run state first);
    :meth:`hand_over` gives that payload to Lightning's own restore so the file is not read again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._handed: dict[str, dict] = {}

    def hand_over(self, path: Path, payload: dict) -> None:
        self._handed[str(Path(path).resolve())] = payload

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        write_checkpoint(checkpoint, Path(path))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        payload = self._handed.pop(str(Path(path).resolve()), None)
        return payload if payload is not None else read_checkpoint(Path(path))


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
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        # The VLAs' flow-matching noise and timesteps come from the CUDA generators on a GPU.
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(cuda))
    kind, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
