"""Under DDP every rank keeps its own copy of the algorithm's state; after each task each rank writes a
digest of it (``<run>/rank_states/rank<k>.json``) so tests and users can check the ranks agree."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from cl_vla.training.checkpointing import atomic_write_json

if TYPE_CHECKING:
    from cl_vla.training.continual_run import ContinualRun


def record_rank_state(run: ContinualRun) -> None:
    """Under DDP, each rank writes a digest of its algorithm state so ranks can be checked to agree."""
    if run.trainer.world_size <= 1:
        return
    digest = hashlib.sha256()
    hash_into(digest, run.algorithm.state_dict())
    atomic_write_json(
        run.run_dir / "rank_states" / f"rank{run.trainer.global_rank}.json",
        {"task": run.state.task - 1, "sha256": digest.hexdigest()},
    )


def hash_into(digest: Any, obj: Any) -> None:
    """Feed a state (tensors by their bytes, containers in key order) into ``digest``."""
    if isinstance(obj, torch.Tensor):
        digest.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            digest.update(str(k).encode())
            hash_into(digest, obj[k])
    elif isinstance(obj, list | tuple):
        for x in obj:
            hash_into(digest, x)
    else:
        digest.update(repr(obj).encode())
