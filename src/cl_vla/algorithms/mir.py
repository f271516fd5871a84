"""Maximally Interfered Retrieval (MIR; Aljundi et al., 2019): replay what the next step would hurt most."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import functional_call
from torch.utils.data import default_collate

from cl_vla.algorithms.base import TaskContext, rank_and_world
from cl_vla.algorithms.der import eval_mode, forked_rng, take_rows
from cl_vla.algorithms.er import ReplayBuffer, _is_positive_int
from cl_vla.algorithms.memory_prefetch import MemoryPrefetcher
from cl_vla.algorithms.replay_memory import entropy
from cl_vla.algorithms.sharded import any_sharded, local, reshard

# A stream word of its own, so candidate draws never coincide with ER's populate/sample streams (1, 2).
_CANDIDATE_STREAM = 3


class MIR(ReplayBuffer):
    """Experience replay whose replayed samples are the stored ones the current update would hurt most.

    The paper's step, for an incoming batch ``B_n`` with parameters ``theta`` and learning rate ``lr``:

    1. virtual update ``theta_v = theta - lr * grad L(B_n; theta)``;
    2. draw ``C`` candidates from memory and score each ``s(x) = l(x; theta_v) - l(x; theta)``;
    3. train on ``B_n`` together with the ``k`` candidates of largest score.

    In cl_vla the batch sampler picks replay indices *before* the batch (and its gradient) exists, and
    with DataLoader workers it runs several batches ahead, so choosing the next step's replay indices
    would act on a stale gradient and make the run depend on prefetch timing. MIR therefore runs
    entirely in :meth:`after_backward`, where the current batch's gradient is in ``.grad`` (already
    averaged across ranks under DDP), exactly as in the authors' code:

    - the candidates are ``mir_candidates`` stored references drawn uniformly without replacement, with
      a generator seeded by ``(seed, task, rank, global step)`` (a pure function: nothing to save, a
      resumed run draws the same), fetched from the attached datasets, collated and preprocessed;
    - their per-sample losses at ``theta`` and at ``theta_v`` are computed without touching the weights
      (``torch.func.functional_call``), in eval mode and under one forked, identically seeded RNG, so
      dropout or diffusion noise does not masquerade as interference and the run's stream is unchanged;
    - the ``k`` highest-scoring candidates' mean loss at ``theta`` (train mode) is differentiated and its
      gradient *added* to ``.grad`` before the optimizer step, i.e. the step minimises
      ``L(B_n) + L(B_MC)`` as in the reference implementation (one ``backward`` per term).

    The candidates are a pure function of the step, so the coming steps' candidates are drawn and
    decoded ahead in the run's DataLoader workers (:mod:`cl_vla.algorithms.memory_prefetch`); without
    workers they are decoded in the main process.

    The virtual step is plain SGD with ``virtual_lr``, or the current learning rate when unset. To first
    order the ranking does not depend on it (``s(x) ~ -lr * g . grad l(x)``); it matters only for how far
    into the nonlinear regime the look-ahead reaches. Cost per step: ``2 * mir_candidates`` no-grad
    forwards plus one forward/backward on ``k`` samples (the candidates are decoded ahead, see below).

    ``replay_batch_ratio`` defaults to 0 here (all replay is MIR's); a positive value additionally mixes
    random replay into the batch like ER. Under DDP each rank draws its own candidates and the added
    gradients are averaged across ranks, so the replicas stay identical.

    Args:
        mir_candidates: Candidates scored per step (the paper's ``C``).
        k: Candidates replayed per step (the paper's retrieved batch size).
        virtual_lr: Learning rate of the virtual SGD step; ``None`` uses the optimizer's current one.
        buffer_size_per_task: Maximum number of samples stored per task (at least ``k``).
        seed: Random seed for reproducibility.
        replay_batch_ratio: Extra random replay mixed into each batch, in [0, 1).
        balanced_sampling: Balanced draws for that extra replay (candidates are always uniform).
    """

    name = "mir"

    def __init__(
        self,
        mir_candidates: int = 50,
        k: int = 10,
        virtual_lr: float | None = None,
        buffer_size_per_task: int = 500,
        seed: int = 42,
        replay_batch_ratio: float = 0.0,
        balanced_sampling: bool = False,
    ) -> None:
        super().__init__(buffer_size_per_task, seed, replay_batch_ratio, balanced_sampling)
        self._check_mir_hparams(mir_candidates, k, virtual_lr, buffer_size_per_task)
        self.mir_candidates = int(mir_candidates)
        self.k = int(k)
        self.virtual_lr = None if virtual_lr is None else float(virtual_lr)
        #: References replayed at the last step, highest interference first (for inspection and logs).
        self.last_retrieved: list[int] = []
        #: Their interference scores and mean loss (detached tensors; no device sync per step).
        self.last_scores: Tensor | None = None
        self.last_replay_loss: Tensor | None = None
        # Candidates are decoded ahead in the run's loader workers, for the (task, rank) of the last step.
        self._prefetch = MemoryPrefetcher(self._load_candidates)
        self._draw_at = (0, 0)

    @staticmethod
    def _check_mir_hparams(mir_candidates: Any, k: Any, virtual_lr: Any, buffer_size_per_task: Any) -> None:
        if isinstance(mir_candidates, bool) or not _is_positive_int(mir_candidates):
            raise ValueError(f"mir_candidates must be a positive int, got {mir_candidates!r}.")
        if isinstance(k, bool) or not _is_positive_int(k) or k > mir_candidates:
            raise ValueError(
                f"k must be a positive int no larger than mir_candidates={mir_candidates}, got {k!r}."
            )
        if int(buffer_size_per_task) < int(k):
            raise ValueError(
                f"buffer_size_per_task={buffer_size_per_task} is smaller than one retrieved batch (k={k}); "
                "it must be at least k."
            )
        if virtual_lr is not None:
            try:
                ok = float(virtual_lr) > 0 and np.isfinite(float(virtual_lr))
            except (TypeError, ValueError):
                ok = False
            if isinstance(virtual_lr, bool) or not ok:
                raise ValueError(f"virtual_lr must be a positive number or null, got {virtual_lr!r}.")

    # ---- the MIR step ---------------------------------------------------------------------------

    def candidate_pairs(self, task: int, rank: int, step: int) -> tuple[list[tuple[int, int]], int]:
        """One step's ``(task, reference)`` candidates (uniform, distinct while the buffer allows) and the
        seed of the noise both scoring passes share; a pure function of ``(seed, task, rank, step)``."""
        rng = np.random.default_rng([entropy(self.seed), _CANDIDATE_STREAM, int(task), int(rank), int(step)])
        pairs = self._draw(min(self.mir_candidates, len(self)), rng, balanced=False)
        return pairs, int(rng.integers(2**62))

    def _load_candidates(self, step: int) -> tuple[list[tuple[int, int]], int, dict]:
        """``candidate_pairs`` of ``step`` and the candidates collated (runs in prefetch workers)."""
        pairs, noise_seed = self.candidate_pairs(*self._draw_at, step)
        return pairs, noise_seed, dict(default_collate(self._fetch(pairs)))

    def on_task_start(self, task_id: int, context: TaskContext | None = None) -> None:
        if context is None:
            self._prefetch.use_loader(None)
        else:
            self._prefetch.use_loader(context.make_loader, context.memory_workers)

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        self._prefetch.close()
        super().on_task_end(task_id, context)

    def after_backward(self, module: Any, batch: Mapping[str, Any]) -> None:
        """Score candidates against the current gradient and add the top ``k``'s loss gradient."""
        if len(self) == 0:
            return
        policy = getattr(module, "policy", module)
        params = {n: p for n, p in policy.named_parameters() if p.requires_grad and p.grad is not None}
        if not params:
            return
        self.memory.require_datasets()
        step = int(getattr(module, "global_step", 0))
        task, rank = int(getattr(module, "task", 0)), int(getattr(module, "global_rank", 0))
        self._draw_at = (task, rank)
        key = (task, rank, self.memory.version, self.seed, self.mir_candidates)
        pairs, noise_seed, collated = self._prefetch.get(step, key)
        preprocess = getattr(module, "preprocessor", None) or (lambda b: b)
        candidates = preprocess(dict(collated))
        scores = interference_scores(policy, candidates, params, self._lr(module), noise_seed)
        top = select_top(scores, self.k)
        self.last_retrieved = [pairs[i][1] for i in top]
        self.last_scores = scores[top].detach()
        replay = take_rows(candidates, top, len(pairs))
        loss = policy(replay)[0].mean()
        if any_sharded(list(params.values())):
            # FSDP's backward averages over the ranks and adds to the step's gradient shards.
            loss.backward()
            self.last_replay_loss = loss.detach()
            return
        names = list(params)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        _, world = rank_and_world()
        for name, g in zip(names, grads, strict=True):
            if g is None:
                continue
            if world > 1:
                # The current batch's gradient was averaged by DDP; this term must be too.
                dist.all_reduce(g)
                g = g / world
            params[name].grad.add_(g)
        self.last_replay_loss = loss.detach()

    def _lr(self, module: Any) -> float:
        if self.virtual_lr is not None:
            return self.virtual_lr
        with contextlib.suppress(AttributeError, RuntimeError, IndexError, TypeError):
            return float(module.trainer.optimizers[0].param_groups[0]["lr"])
        lr = getattr(module, "lr", None)
        if lr is None:
            raise ValueError(
                "MIR needs virtual_lr when the module has no optimizer to read the learning rate from."
            )
        return float(lr)

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """ER's snapshot plus MIR's hyperparameters (candidates are a function of the step: nothing else)."""
        state = super().state_dict()
        state.update(mir_candidates=self.mir_candidates, k=self.k, virtual_lr=self.virtual_lr)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore exactly; rejects invalid hyperparameters in the state."""
        self._check_mir_hparams(
            state["mir_candidates"], state["k"], state["virtual_lr"], state["buffer_size_per_task"]
        )
        super().load_state_dict(state)
        self.mir_candidates, self.k = int(state["mir_candidates"]), int(state["k"])
        self.virtual_lr = None if state["virtual_lr"] is None else float(state["virtual_lr"])

    def __repr__(self) -> str:
        return (
            f"MIR(mir_candidates={self.mir_candidates}, k={self.k}, virtual_lr={self.virtual_lr}, "
            f"buffer_size_per_task={self.buffer_size_per_task}, "
            f"tasks={ {t: self.get_task_size(t) for t in self.get_task_ids()} })"
        )


def select_top(scores: Tensor, k: int) -> list[int]:
    """Positions of the ``k`` largest scores, largest first; ties go to the earlier candidate."""
    # A stable sort makes ties deterministic (topk's tie order is unspecified across devices).
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    return order[: min(k, len(order))].tolist()


def interference_scores(
    policy: torch.nn.Module,
    batch: Mapping[str, Any],
    params: Mapping[str, Tensor],
    lr: float,
    noise_seed: int = 0,
) -> Tensor:
    """Per-sample loss increase ``l(x; theta - lr * grad) - l(x; theta)`` for a preprocessed ``batch``.

    ``params`` are the parameters whose ``.grad`` defines the virtual step (others stay as they are).
    Evaluated in eval mode under a forked RNG seeded with ``noise_seed`` for both passes.
    """
    with torch.no_grad(), eval_mode(policy):
        with forked_rng(policy, noise_seed):
            before = per_sample_losses(policy, batch)
        if any_sharded(list(params.values())):
            after = _after_virtual_step_in_place(policy, batch, params, lr, noise_seed)
        else:
            virtual = {n: p.detach() - lr * p.grad for n, p in params.items()}
            with forked_rng(policy, noise_seed):
                after = per_sample_losses(policy, batch, virtual)
    return after - before


def _after_virtual_step_in_place(
    policy: torch.nn.Module,
    batch: Mapping[str, Any],
    params: Mapping[str, Tensor],
    lr: float,
    noise_seed: int,
) -> Tensor:
    """FSDP: the virtual step taken on this rank's shards in place (FSDP gathers what the forward
    reads), the losses read, the shards put back bit for bit. Holds one copy of the shards (1/N)."""
    shards = [local(p) for p in params.values()]
    saved = [s.clone() for s in shards]
    try:
        reshard(policy)  # the next forward gathers the stepped shards, not the root it kept gathered
        # theta - lr * grad as the whole-tensor path computes it (product, then difference).
        torch._foreach_sub_(shards, torch._foreach_mul([local(p.grad) for p in params.values()], lr))
        with forked_rng(policy, noise_seed):
            return per_sample_losses(policy, batch)
    finally:
        torch._foreach_copy_(shards, saved)
        reshard(policy)


def per_sample_losses(
    policy: torch.nn.Module, batch: Mapping[str, Any], params: Mapping[str, Tensor] | None = None
) -> Tensor:
    """One loss per sample: ``forward(batch, reduction="none")``, else one forward per sample."""
    size = _batch_size(batch)

    def run(b: Mapping[str, Any], **kwargs: Any) -> Tensor:
        out = functional_call(policy, dict(params or {}), (dict(b),), kwargs, strict=False)
        return torch.as_tensor(out[0] if isinstance(out, tuple) else out)

    with contextlib.suppress(TypeError, ValueError):
        losses = run(batch, reduction="none")
        if losses.shape == (size,):
            return losses
    # Policies without per-sample reduction (bounded cost: at most mir_candidates forwards).
    return torch.stack([run(take_rows(batch, [i], size)).mean() for i in range(size)])


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("cannot infer the candidates' batch size: the batch holds no tensor.")


__all__ = ["MIR", "interference_scores", "per_sample_losses", "select_top"]
