"""Atomic, digest-checked checkpoints and the run state that lets an interrupted run continue exactly.

A checkpoint is Lightning's (model, optimizer, loop progress) plus ``checkpoint["cl_vla"]``: the loop
position and R matrix so far, the algorithm's full state, the normalization statistics in use and the
RNG states. It is loaded with ``weights_only=True``: everything in it is tensors and plain containers.

Every checkpoint ``X.ckpt`` has a sidecar ``X.ckpt.sha256`` (``sha256sum -c`` format) written with it;
loading verifies it, so a damaged or altered file is refused instead of silently resumed. ``state.json``
records every checkpoint's digest a second time, so a damaged sidecar is named as the damaged file and
its checkpoint is still verified.
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
        #: the OSError a write raised: torch.save reports it only as "unexpected pos", losing the cause
        self.error: OSError | None = None

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def digest_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + DIGEST_SUFFIX)


def _write_digests(ckpt: Path, digests: list[str]) -> None:
    text = "".join(f"{d}  {ckpt.name}\n" for d in digests)
    atomic_write_bytes(digest_path(ckpt), text.encode())


class DamagedSidecar(Exception):
    """A ``.sha256`` sidecar that cannot be parsed: the sidecar is the damaged file, not its checkpoint."""


def recorded_digests(ckpt: Path) -> list[str] | None:
    """Digests the sidecar accepts for ``ckpt`` (two only while a replacement is being renamed into
    place); ``None`` for a checkpoint written before digests existed. Raises :class:`DamagedSidecar`
    (saying how) when the sidecar is empty or holds a line that is not ``<64 hex digits>  <name>``."""
    side = digest_path(ckpt)
    if not side.is_file():
        return None
    try:
        lines = [ln for ln in side.read_text().splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise DamagedSidecar("it is not text") from None
    if not lines:
        raise DamagedSidecar("it is empty")
    digests = [ln.split()[0] for ln in lines]
    if any(len(d) != 64 or any(c not in "0123456789abcdef" for c in d) for d in digests):
        raise DamagedSidecar("it holds no complete sha256 digest: truncated or overwritten")
    return digests


def state_digests(ckpt_dir: Path) -> dict[str, str]:
    """The checkpoint digests ``ckpt_dir/state.json`` records, by file name: a second record beside each
    sidecar, so a damaged sidecar does not make its intact checkpoint unusable."""
    try:
        digests = json.loads((ckpt_dir / STATE_FILE).read_text()).get("digests", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in digests.items() if isinstance(v, str)} if isinstance(digests, dict) else {}


def state_digest(ckpt: Path) -> str | None:
    return state_digests(ckpt.parent).get(ckpt.name)


def write_checkpoint(checkpoint: dict, path: Path) -> str:
    """Write ``checkpoint`` atomically and durably with its digest.

    Order: data to a temporary file (fsync) -> sidecar lists the new digest and the old one -> rename ->
    sidecar lists the new digest only. A kill at any point leaves ``path`` (old or new) matching a digest
    in its sidecar, so a crash never makes a good checkpoint look damaged.
    """
    tmp = _tmp_name(path)
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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
    except Exception as e:
        cause = writer.error if writer is not None and writer.error is not None else e
        if not isinstance(cause, OSError):
            raise
        tmp.unlink(missing_ok=True)  # the partial file; the checkpoints on disk stay as they were
        run_dir = path.parent.parent
        raise CheckpointError(
            f"Writing checkpoint {str(path)!r} failed ({cause.strerror or cause}); the checkpoints already "
            f"written are intact: free space (or fix the folder) and continue with resume={str(run_dir)!r}."
        ) from e
    return digest


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checkpoint(ckpt: Path) -> None:
    """Raise one sentence if ``ckpt`` matches no digest recorded when it was written (its sidecar's, or
    state.json's when the sidecar is damaged or disagrees); name the sidecar when it is the damaged file."""
    side = digest_path(ckpt).name
    try:
        expected = recorded_digests(ckpt)
    except DamagedSidecar as e:
        second = state_digest(ckpt)
        if second is None:
            raise CheckpointError(
                f"The digest file {str(digest_path(ckpt))!r} is damaged ({e}) and no other record of "
                f"{ckpt.name}'s digest exists, so the checkpoint (not known to be damaged) cannot be "
                f"verified; restore {side}, or delete it to resume from {ckpt.name} unverified."
            ) from None
        if file_sha256(ckpt) != second:
            _refuse_damaged(ckpt, f"{STATE_FILE}; its {side} is damaged too")
        print(
            f"warning: {side} is damaged ({e}); {ckpt.name} matches the digest {STATE_FILE} recorded "
            "for it and is used.",
            file=sys.stderr,
        )
        return
    if expected is None:
        print(
            f"warning: {ckpt.name} has no {DIGEST_SUFFIX} digest (written by an older cl_vla); "
            "its integrity cannot be checked.",
            file=sys.stderr,
        )
        return
    actual = file_sha256(ckpt)
    if actual in expected:
        return
    if actual == state_digest(ckpt):
        print(
            f"warning: {side} does not hold the digest of {ckpt.name}, but {STATE_FILE} does: the "
            "digest file was altered, not the checkpoint, which is used.",
            file=sys.stderr,
        )
        return
    _refuse_damaged(ckpt, side)


def _refuse_damaged(ckpt: Path, record: str) -> None:
    others = sorted(p.name for p in ckpt.parent.glob("*.ckpt") if p != ckpt)
    hint = f"; resume from an earlier one ({', '.join(others)})" if others else ""
    raise CheckpointError(
        f"Checkpoint {str(ckpt)!r} does not match the sha256 digest recorded when it was written "
        f"({record}): it was damaged or altered since{hint}."
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
        #: sha256 of each checkpoint this process wrote, by file name (recorded in state.json too).
        self.digests: dict[str, str] = {}

    def hand_over(self, path: Path, payload: dict) -> None:
        self._handed[str(Path(path).resolve())] = payload

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        self.digests[Path(path).name] = write_checkpoint(checkpoint, Path(path))

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
