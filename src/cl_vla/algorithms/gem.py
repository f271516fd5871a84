"""Gradient Episodic Memory (GEM; Lopez-Paz & Ranzato, NeurIPS 2017).

An episodic memory keeps ``memory_per_task`` frames of every finished task (as references into the
dataset, like ER). At every step, after backward, the gradient ``g_k`` of each past task's memory loss
is computed; if the current gradient ``g`` has a negative inner product with any of them, ``g`` is
replaced by the closest vector (in L2) that has none: the dual QP

    min_v  1/2 v^T G G^T v + g^T G^T v,   v >= 0,        g~ = G^T v + g      (G: one g_k per row)

solved here through a K x K non-negative least-squares problem (K = number of past tasks), so no QP
package is needed. ``margin`` is the paper's ``memory_strength`` γ: its code solves with ``v >= γ``,
which is the same as projecting ``g + γ G^T 1`` (a push towards the past tasks' gradients).

This module also holds what GEM shares with A-GEM (:mod:`cl_vla.algorithms.agem`): the episodic
memory and the memory-gradient machinery (:class:`EpisodicGradientAlgorithm`). The projection and
the flat-gradient helpers are in :mod:`cl_vla.algorithms.gradient_projection`.

Memory frames: a step's draw is a pure function of ``(seed, rank, step)``, so the batches of the
coming steps are decoded ahead in the run's DataLoader workers (``context.make_loader``, kept from
the task-start hook; :mod:`cl_vla.algorithms.memory_prefetch`) while the main process computes;
without workers (``data.num_workers=0``, or no task-start hook since a mid-task resume) they are
decoded in the main process. Either way a batch is the drawn frames collated as the run's loader
collates them (``default_collate``).

Under DDP the current gradient is already averaged over ranks when ``after_backward`` runs, but the
memory gradients are computed locally (each rank draws its own memory batch): they are all-reduced
(averaged) so every rank projects identically and the replicas stay equal. With fp16 loss scaling the
current gradient is still scaled when ``after_backward`` runs: the projection without margin (and
A-GEM's) does not depend on that scale, the margin term does (bf16 and fp32 have no scaler).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from cl_vla.algorithms.base import CLAlgorithm, TaskContext, rank_and_world, to_device
from cl_vla.algorithms.gradient_projection import flat_grad, gem_project, non_negative_float, write_flat_grad
from cl_vla.algorithms.memory_prefetch import MemoryPrefetcher
from cl_vla.algorithms.parameters import policy_of, trainable_parameters
from cl_vla.algorithms.replay_memory import ReplayMemory, entropy
from cl_vla.algorithms.sharded import any_sharded

_STATE_VERSION = 1

# Distinct SeedSequence words keep the memory selection and the per-step draws independent streams.
_POPULATE_STREAM = 11
_STEP_STREAM = 12
_SAMPLE_STREAM = 13


def _positive_int(name: str, value: Any) -> int:
    ok = not isinstance(value, bool)
    try:
        ok = ok and int(value) == value and int(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _module_device(module: Any, params: Sequence[torch.Tensor]) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return params[0].device if params else torch.device("cpu")


def shard_reduction(params: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Under FSDP, the all-reduce (sum) that completes inner products of this rank's gradient shards;
    None for whole tensors."""
    if not any_sharded(params):
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    return reduce


class EpisodicGradientAlgorithm(CLAlgorithm):
    """What GEM and A-GEM share: an episodic memory filled at task ends and memory gradients.

    Subclasses implement :meth:`after_backward`. Nothing is replayed into the training batches
    (``replay_batch_ratio`` stays 0): the memory only constrains the gradient.
    """

    name = "episodic_gradient"
    #: GEM needs every batch drawn inside one task's memory to fit; A-GEM draws across all tasks.
    _batch_within_task = True

    def __init__(
        self, memory_per_task: int = 256, memory_batch_size: int = 256, margin: float = 0.0, seed: int = 0
    ) -> None:
        self._check_hparams(memory_per_task, memory_batch_size, margin)
        self.memory_per_task = int(memory_per_task)
        self.memory_batch_size = int(memory_batch_size)
        self.margin = float(margin)
        self.seed = int(seed)
        self._memory = ReplayMemory(self.memory_per_task, self.seed, stream=_POPULATE_STREAM)
        self._prefetch = MemoryPrefetcher(self._load_step)
        self._rank = 0  # the rank whose draws the prefetch workers decode
        #: Gradient edits done so far (the step counter that seeds each step's memory draw) and how
        #: many of them changed the gradient; both checkpointed so a resume draws the same batches.
        self.num_steps = 0
        self.num_projections = 0
        self._sample_calls = 0

    def __len__(self) -> int:
        """Frames held in the episodic memory (as dataset references)."""
        return len(self._memory)

    @classmethod
    def _check_hparams(cls, memory_per_task: Any, memory_batch_size: Any, margin: Any) -> None:
        per_task = _positive_int("memory_per_task", memory_per_task)
        batch = _positive_int("memory_batch_size", memory_batch_size)
        non_negative_float("margin", margin)
        if cls._batch_within_task and per_task < batch:
            raise ValueError(
                f"memory_per_task={per_task} is smaller than one memory batch (memory_batch_size={batch}); "
                "it must hold at least memory_batch_size frames."
            )

    # ---- hooks ----------------------------------------------------------------------------------

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """No-op: the memory is filled from the whole task dataset at its end."""

    def on_task_start(self, task_id: int, context: TaskContext | None = None) -> None:
        if context is None:
            self._prefetch.use_loader(None)
        else:
            self._prefetch.use_loader(context.make_loader, context.memory_workers)

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """Select ``memory_per_task`` references of ``context.train_dataset`` for ``task_id``."""
        self._prefetch.close()
        if context is not None and context.train_dataset is not None:
            self._memory.populate(task_id, context.train_dataset)

    def attach_dataset(self, task_id: int, dataset: Any) -> None:
        """Called by the loop after a resume for every finished task (see ``ReplayBuffer``)."""
        self._memory.attach(task_id, dataset)

    def sample(self, batch_size: int) -> list[dict]:
        """The seed interface: ``batch_size`` memory frames drawn uniformly (empty before any task ends)."""
        rng = np.random.default_rng([entropy(self.seed), _SAMPLE_STREAM, self._sample_calls])
        self._sample_calls += 1
        pairs = self._draw_across(rng, int(batch_size), replace=True)
        ds = self._memory.subset(self._refs_of(pairs)) if pairs else None
        return [] if ds is None else [ds[i] for i in range(len(ds))]

    def memory_bytes(self) -> int:
        """Bytes held between steps: 8 per stored reference (frames stay in the dataset)."""
        return self._memory.memory_bytes()

    # ---- memory draws and gradients ---------------------------------------------------------------

    @property
    def memory(self) -> ReplayMemory:
        return self._memory

    def _step_rng(self, step: int, rank: int) -> np.random.Generator:
        # A pure function of (seed, rank, step): ranks draw different frames, a resume the same ones.
        return np.random.default_rng([entropy(self.seed), _STEP_STREAM, rank, step])

    def _step_draws(self, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        """The memory batches one step draws, as ``(task, position)`` pairs (subclasses)."""
        raise NotImplementedError

    def _load_step(self, step: int) -> list[dict]:
        """The collated memory batches of ``step`` for rank ``self._rank`` (runs in prefetch workers)."""
        return [self._load_batch(pairs) for pairs in self._step_draws(self._step_rng(step, self._rank))]

    def _memory_batches(self) -> list[dict]:
        """This step's memory batches, decoded ahead where the run has loader workers."""
        self._rank, _ = rank_and_world()
        key: Hashable = (self._memory.version, self.memory_batch_size, self.seed, self._rank)
        return self._prefetch.get(self.num_steps, key)

    def _draw_within(self, rng: np.random.Generator, task_id: int) -> list[tuple[int, int]]:
        size = self._memory.size(task_id)
        n = min(self.memory_batch_size, size)
        return [(task_id, int(p)) for p in np.sort(rng.choice(size, size=n, replace=False))]

    def _draw_across(
        self, rng: np.random.Generator, num: int, replace: bool = False
    ) -> list[tuple[int, int]]:
        tasks = self._memory.task_ids()
        if not tasks or num <= 0:
            return []
        sizes = np.array([self._memory.size(t) for t in tasks])
        total = int(sizes.sum())
        flat = rng.choice(total, size=num if replace else min(num, total), replace=replace)
        if not replace:
            flat = np.sort(flat)
        owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return [(tasks[o], int(f - starts[o])) for o, f in zip(owner, flat, strict=True)]

    def _refs_of(self, pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """``(task, position in its memory)`` pairs as ``(task, reference)`` pairs."""
        return [(t, int(self._memory.refs(t)[pos])) for t, pos in pairs]

    def _load_batch(self, pairs: Sequence[tuple[int, int]]) -> dict:
        ds = self._memory.subset(self._refs_of(pairs))
        return default_collate([ds[i] for i in range(len(ds))])

    def _memory_gradient(self, module: Any, params: Sequence[torch.Tensor], batch: Mapping) -> torch.Tensor:
        """The gradient of the policy loss on a memory ``batch``, leaving ``.grad`` untouched.

        Under FSDP this rank's shards of it, already averaged over the ranks: only ``backward`` runs
        FSDP's gradient reduction, so it runs with the step's gradients set aside and put back."""
        batch = to_device(dict(batch), _module_device(module, params))
        if any_sharded(params):
            saved = [p.grad for p in params]
            for p in params:
                p.grad = None
            try:
                with torch.enable_grad():
                    module.compute_loss(batch)[0].backward()
                return flat_grad(params).detach().clone()
            finally:
                for p, g in zip(params, saved, strict=True):
                    p.grad = g
        with torch.enable_grad():
            loss, _ = module.compute_loss(batch)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        return flat_grad(params, grads).detach()

    @staticmethod
    def _average_over_ranks(tensor: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """DDP: the mean of every rank's memory gradient (FSDP's backward already took it)."""
        _, world = rank_and_world()
        if world > 1 and not any_sharded(params):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= world
        return tensor

    @staticmethod
    def _log(module: Any, name: str, value: float) -> None:
        # Only inside a Trainer: LightningModule.log outside one warns or fails.
        if getattr(module, "_trainer", None) is not None and hasattr(module, "log"):
            module.log(name, value, batch_size=1)

    # ---- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, memory references per task and the step counters (plain values only)."""
        return {
            "name": self.name,
            "version": _STATE_VERSION,
            "memory_per_task": self.memory_per_task,
            "memory_batch_size": self.memory_batch_size,
            "margin": self.margin,
            "seed": self.seed,
            "num_steps": self.num_steps,
            "num_projections": self.num_projections,
            "sample_calls": self._sample_calls,
            "memory": self._memory.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly; datasets already attached to kept tasks stay attached."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state is for algorithm {state.get('name')!r}, not {self.name!r}.")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"unsupported {self.name} state version {state.get('version')!r}; expected 1.")
        self._check_hparams(state["memory_per_task"], state["memory_batch_size"], state["margin"])
        seed, num_steps = int(state["seed"]), int(state["num_steps"])
        num_projections, sample_calls = int(state["num_projections"]), int(state.get("sample_calls", 0))
        self._memory.load_state_dict(state["memory"])  # validates everything before replacing anything
        self._memory.per_task, self._memory.seed = int(state["memory_per_task"]), seed
        self.memory_per_task = int(state["memory_per_task"])
        self.memory_batch_size = int(state["memory_batch_size"])
        self.margin = float(state["margin"])
        self.seed, self.num_steps, self.num_projections = seed, num_steps, num_projections
        self._sample_calls = sample_calls

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(memory_per_task={self.memory_per_task}, "
            f"memory_batch_size={self.memory_batch_size}, margin={self.margin}, seed={self.seed}, "
            f"tasks={ {t: self._memory.size(t) for t in self._memory.task_ids()} })"
        )


class GEM(EpisodicGradientAlgorithm):
    """Gradient Episodic Memory: never let a step increase a past task's memory loss (to first order).

    Args:
        memory_per_task: References kept per finished task (the paper: 256).
        memory_batch_size: Memory frames per past task and step; the whole memory (the paper) when
            equal to ``memory_per_task``; lower it to bound the cost of K extra forward/backward passes.
        margin: The paper's ``memory_strength`` γ >= 0 (0.5 in its experiments).
        seed: Seeds the memory selection and the per-step memory draws.
    """

    name = "gem"

    def __init__(
        self, memory_per_task: int = 256, memory_batch_size: int = 256, margin: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__(memory_per_task, memory_batch_size, margin, seed)

    def _step_draws(self, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        return [self._draw_within(rng, t) for t in self._memory.task_ids()]

    def after_backward(self, module: Any, batch: Mapping[str, Any]) -> None:
        """Project the current gradient when it conflicts with a past task's memory gradient."""
        tasks = self._memory.task_ids()
        if not tasks:
            return
        params = list(trainable_parameters(policy_of(module)).values())
        G = torch.stack([self._memory_gradient(module, params, b) for b in self._memory_batches()])
        G = self._average_over_ranks(G, params)
        self.num_steps += 1  # only once the step's draw was used: a failed step is drawn again
        g = flat_grad(params).detach()
        projected = gem_project(g, G, self.margin, shard_reduction(params) or (lambda t: t))
        changed = projected is not g
        if changed:
            write_flat_grad(params, projected)
            self.num_projections += 1
        self._log(module, "train/gem_projected", float(changed))


__all__ = ["GEM", "EpisodicGradientAlgorithm"]
