"""The interface every continual-learning algorithm implements.

The continual loop (:mod:`cl_vla.training.loop`) talks to an algorithm only through these hooks, so a new
method is one file in this package plus one YAML in ``conf/algorithm/``; the loop never branches on
the algorithm's type.

Order of calls for one task ``t`` (each rank under DDP calls every hook):

    setup(module)              (once; again after a resume restored the state)
    on_task_start(t, ctx)
    training_tasks(t)          -> which tasks' frames form the current stream (multitask: all so far)
    replay_indices(n, rng)     -> dataset indices mixed into each batch at ``replay_batch_ratio``
                                  (drawn by the DataLoader's batch sampler; frames decoded by its workers)
    for every step:
        loss = policy loss + penalty(module, batch, outputs)
        backward; after_backward(module, batch)     (gradient edits: GEM / A-GEM)
        optimizer step; observe(batch, module=..., outputs=...)
    on_task_end(t, ctx)        (ER fills its buffer, EWC computes Fisher, LwF snapshots a teacher)
    state_dict()               -> saved with every checkpoint
    eval_context(j, module)    -> wraps the evaluation of task j (masks, adapters)

The seed's interface was ``observe``, ``sample``, ``on_task_end``, ``state_dict`` and
``load_state_dict``; four of them are abstract here. ``sample`` is kept with a neutral default (the
loop never calls it: replay reaches the batches through ``replay_indices``), and ER, GEM / A-GEM and
DER++ still implement it. The other hooks have neutral defaults too.

Two helpers every algorithm may use live here as well: :func:`rank_and_world` (this process's DDP
rank and the world size, ``(0, 1)`` without DDP) and :func:`to_device` (a collated batch moved to a
device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process under ``torch.distributed``; ``(0, 1)`` without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device``, through mappings, lists and tuples."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass
class TaskContext:
    """What the loop hands to task-boundary hooks.

    ``module`` is the LightningModule (``module.policy`` the lerobot policy); ``train_dataset`` the
    current task's training frames (a :class:`~cl_vla.data.TaskFilteredDataset`, whose
    ``frame_indices`` are indices into the shared LeRobot dataset); ``make_loader(dataset)`` builds a
    DataLoader with the run's collate, workers and preprocessing; ``compute_loss(batch)`` runs the
    policy's preprocessor and forward pass and returns ``(loss, outputs)``. ``memory_workers`` is how
    many processes decode memory batches ahead for GEM, A-GEM and MIR (0: inside the step; None: as
    many as ``make_loader``'s; :func:`cl_vla.algorithms.memory_prefetch.memory_workers`).
    """

    task_id: int
    task_name: str
    num_tasks: int
    module: Any = None
    train_dataset: Dataset | None = None
    make_loader: Callable[..., Iterable[dict]] | None = None
    memory_workers: int | None = None
    compute_loss: Callable[[dict], tuple[torch.Tensor, dict]] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_size: int = 1
    rank: int = 0


class CLAlgorithm(ABC):
    """Interface every continual-learning algorithm must satisfy."""

    #: Name used in configs and logs.
    name: str = "base"

    # ---- the seed's interface -------------------------------------------------------------------

    @abstractmethod
    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """Called every training step with the current task batch (after the optimizer step)."""

    @abstractmethod
    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """Hook invoked after a task finishes."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Snapshot of the algorithm's full state: JSON-compatible values and tensors only."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a snapshot produced by :meth:`state_dict` exactly (nothing is re-sampled)."""

    # ---- hooks with neutral defaults ----------------------------------------------------------------

    def sample(self, batch_size: int) -> Any:
        """The seed's replay hook: ``batch_size`` stored samples, or None when there is nothing to give.

        The continual loop never calls it: replayed frames reach the training batches through
        :meth:`replay_indices`, drawn by the DataLoader's batch sampler. Memory-based algorithms (ER,
        GEM / A-GEM, DER++) still implement it for direct use; this default returns None.
        """
        return None

    def setup(self, module: Any) -> None:  # noqa: B027
        """Called once the LightningModule exists, and again after a resume restored this algorithm's
        state (before the weights are loaded): build what the saved state and weights need, e.g.
        adapters or masks injected into ``module.policy``."""

    def eval_context(self, task_id: int, module: Any) -> AbstractContextManager:
        """Context in which task ``task_id`` is evaluated (PackNet applies its mask, per-task LoRA
        selects the task's adapter). Unseen tasks are evaluated too, with their own ``task_id``."""
        return nullcontext()

    def on_task_start(self, task_id: int, context: TaskContext | None = None) -> None:  # noqa: B027
        """Hook invoked before the first step of a task."""

    def training_tasks(self, task_id: int) -> list[int]:
        """Tasks whose frames form the current training stream; joint training widens this."""
        return [task_id]

    #: Share of every training batch drawn through :meth:`replay_indices` (0 disables replay).
    replay_batch_ratio: float = 0.0

    def replay_indices(self, num: int, rng: np.random.Generator) -> list[int]:
        """``num`` stored references (indices into the shared LeRobot dataset) to replay this step.

        Called by the batch sampler in the main process with a generator seeded by
        (seed, task, rank, step), so ranks draw different samples and a resumed run draws the same
        ones. An empty list means nothing to replay yet (the batch is filled from the current task).
        """
        return []

    def penalty(
        self, module: Any, batch: Mapping[str, Any], outputs: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """Extra loss term added to the policy loss inside ``training_step`` (EWC, SI, LwF...)."""
        return None

    def after_backward(self, module: Any, batch: Mapping[str, Any]) -> None:  # noqa: B027
        """Edit gradients in place after ``backward`` and before the optimizer step (GEM, A-GEM)."""
