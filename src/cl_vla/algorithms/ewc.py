"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) and its online variant (Schwarz et al. 2018).

After each task the diagonal of the Fisher information ``F`` of the policy's trainable parameters is
estimated on that task's training frames and the parameters are snapshotted as the anchor ``theta*``.
Later tasks pay a quadratic penalty for moving important parameters away from their anchors:

    separate:  lambda/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2      (one term per finished task)
    online:    lambda/2 * sum_i F_i (theta_i - theta*_i)^2,  F <- gamma * F + F_t, theta* <- latest
               (Schwarz et al. 2018, "Progress & Compress": constant memory in the number of tasks)

The squared-gradient accumulation the Fisher is made of is in :mod:`cl_vla.algorithms.fisher`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Subset

from cl_vla.algorithms.base import CLAlgorithm, TaskContext, rank_and_world
from cl_vla.algorithms.fisher import (
    add_batch_square_grads,
    add_per_sample_square_grads,
    batch_len,
    slice_sample,
)
from cl_vla.algorithms.parameters import trainable_parameters
from cl_vla.algorithms.quadratic_penalty import quadratic_penalty, streamed_quadratic_penalty
from cl_vla.algorithms.sharded import any_sharded, gathered
from cl_vla.algorithms.state_placement import StatePlacement

_STATE_VERSION = 1
_MODES = ("separate", "online")
_FISHERS = ("empirical", "batch")
# Seed of the forked RNG the Fisher is computed under (policies that draw noise in their loss, e.g.
# diffusion, then give the same Fisher on every run, and training's own random stream is untouched).
_FISHER_SEED = 7_919


def _is_positive_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return int(value) == value and int(value) > 0
    except (TypeError, ValueError):
        return False


def _finite_at_least_zero(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and float(value) >= 0.0
    except (TypeError, ValueError):
        return False


@contextmanager
def _fisher_mode(policy: nn.Module, any_param: Tensor) -> Iterator[None]:
    """Eval mode (dropout off, batch statistics frozen) and a forked RNG seeded with ``_FISHER_SEED``:
    the same Fisher on every run, and training's random stream untouched; the mode restored after."""
    was_training = policy.training
    policy.eval()
    devices = [any_param.device.index or 0] if any_param.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(_FISHER_SEED)
            yield
    finally:
        policy.train(was_training)


class EWC(CLAlgorithm):
    """Elastic Weight Consolidation, separate (one penalty per task) or online (one running Fisher).

    **The Fisher is the empirical Fisher.** ``fisher="empirical"`` (the default) estimates
    ``F_i = 1/N sum_n (d loss_n / d theta_i)^2``: the mean over ``fisher_samples`` training frames of
    the squared per-sample gradient of the policy's own training loss. The true Fisher would sample
    targets from the model's predictive distribution, but a regression / flow-matching / diffusion
    policy has no categorical likelihood to sample from, so the observed targets are used (the common
    choice for such models). Per-sample gradients come from ``torch.func`` (``functional_call`` +
    ``vmap`` + ``grad``) through the run's ``compute_loss``; a policy that ``vmap`` cannot trace (one that
    calls ``.item()`` in its forward, for instance) falls back, with one warning, to a loop of single-sample
    gradient passes, which gives the same numbers more slowly. ``fisher="batch"`` squares mini-batch
    gradients instead (LIBERO's baseline): cheaper, but it underestimates ``F`` by roughly the batch
    size's averaging of the gradient noise, so it is an option, never the default.

    The Fisher is computed at :meth:`on_task_end` on ``fisher_samples`` frames spread evenly over the
    task's training set, in eval mode (dropout off, batch statistics frozen: a batch of one must not
    normalize against itself) and inside a forked, fixed-seed RNG, so training's random stream is the
    same with or without EWC. Under DDP each rank takes every ``world_size``-th of those frames and the
    sums are all-reduced, so every rank holds the same Fisher whatever the number of ranks.

    Args:
        mode: ``"separate"`` (Kirkpatrick et al.: one Fisher and anchor per task) or ``"online"``
            (Schwarz et al.: ``F <- gamma * F + F_t`` anchored at the latest task's parameters).
        ewc_lambda: Penalty strength ``lambda`` (>= 0) in ``lambda/2 * sum F (theta - theta*)^2``.
        gamma: Decay of the running Fisher in online mode, in (0, 1]; unused in separate mode.
        fisher: ``"empirical"`` (per-sample squared gradients) or ``"batch"`` (squared batch gradients).
        fisher_samples: Training frames of the finished task the Fisher is estimated on (> 0; all
            frames when the task has fewer).
        fisher_batch_size: Frames per loader batch while estimating; with ``vmap`` the per-sample
            gradients of one batch are held at once (``fisher_batch_size`` x parameters of memory).
        state_dtype: ``"float32"``, ``"bfloat16"`` or None (each parameter's dtype): the precision
            the Fisher and anchors are kept in
            (computed in the parameters' dtype, then stored; the penalty reads them back upcast).
        state_device: ``"params"`` (with each parameter; sharded like it under FSDP) or ``"cpu"``
            (pinned host memory, copied to the device for each step's penalty).
    """

    name = "ewc"

    def __init__(
        self,
        mode: str = "separate",
        ewc_lambda: float = 100_000.0,
        gamma: float = 1.0,
        fisher: str = "empirical",
        fisher_samples: int = 512,
        fisher_batch_size: int = 16,
        state_dtype: str | None = None,
        state_device: str = "params",
    ) -> None:
        self._check_hparams(mode, ewc_lambda, gamma, fisher, fisher_samples, fisher_batch_size)
        self.placement = StatePlacement.parse(state_dtype, state_device)
        self.mode = str(mode)
        self.ewc_lambda = float(ewc_lambda)
        self.gamma = float(gamma)
        self.fisher = str(fisher)
        self.fisher_samples = int(fisher_samples)
        self.fisher_batch_size = int(fisher_batch_size)
        # task id -> parameter name -> tensor. Online mode holds one entry, keyed by the latest task.
        self._importance: dict[int, dict[str, Tensor]] = {}
        self._anchor: dict[int, dict[str, Tensor]] = {}
        self._vmap_ok = True  # set False after the first vmap failure: no warning per batch

    @staticmethod
    def _check_hparams(
        mode: Any, ewc_lambda: Any, gamma: Any, fisher: Any, fisher_samples: Any, fisher_batch_size: Any
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}.")
        if not _finite_at_least_zero(ewc_lambda):
            raise ValueError(f"ewc_lambda must be a finite number >= 0, got {ewc_lambda!r}.")
        try:
            gamma_ok = not isinstance(gamma, bool) and 0.0 < float(gamma) <= 1.0
        except (TypeError, ValueError):
            gamma_ok = False
        if not gamma_ok:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}.")
        if fisher not in _FISHERS:
            raise ValueError(f"fisher must be 'empirical' or 'batch', got {fisher!r}.")
        if not _is_positive_int(fisher_samples):
            raise ValueError(f"fisher_samples must be a positive int, got {fisher_samples!r}.")
        if not _is_positive_int(fisher_batch_size):
            raise ValueError(f"fisher_batch_size must be a positive int, got {fisher_batch_size!r}.")

    # ---- the penalty ----------------------------------------------------------------------------

    def penalty(self, module: Any, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> Tensor | None:
        """``lambda/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``; None before the first task ends."""
        if not self._importance or self.ewc_lambda == 0.0:
            return None
        params = dict(module.policy.named_parameters())
        if self.placement.device == "cpu":
            return self._streamed_penalty(params)
        ps: list[Tensor] = []
        fs: list[Tensor] = []
        anchors: list[Tensor] = []
        for task in sorted(self._importance):
            fisher, anchor = self._importance[task], self._anchor[task]
            for name, f in list(fisher.items()):
                p = params.get(name)
                if p is None:
                    continue
                placed = self.placement.store(f, p)
                if placed is not f:
                    # Placed once, then kept there: a restored state arrives whole, on the CPU.
                    fisher[name] = f = placed
                    anchor[name] = self.placement.store(anchor[name], p)
                ps.append(p)
                fs.append(self.placement.use(f, p))
                anchors.append(self.placement.use(anchor[name], p))
        return quadratic_penalty(self.ewc_lambda / 2.0, ps, fs, anchors) if ps else None

    def _streamed_penalty(self, params: Mapping[str, Tensor]) -> Tensor | None:
        """The penalty with the state in host memory: one task's Fisher and anchor on the device at a
        time (online EWC holds one term; separate EWC streams its terms)."""
        names = [n for n in params if any(n in f for f in self._importance.values())]
        if not names:
            return None
        ps = [params[n] for n in names]
        use, store = self.placement.use, self.placement.store

        def terms():
            for task in sorted(self._importance):
                fisher, anchor = self._importance[task], self._anchor[task]
                ws, anchors = [], []
                for n in names:
                    p = params[n]
                    if n not in fisher:  # not trained when this task ended: no term for it
                        ws.append(torch.zeros_like(p))
                        anchors.append(p.detach())
                        continue
                    fisher[n], anchor[n] = store(fisher[n], p), store(anchor[n], p)  # pinned once, kept so
                    ws.append(use(fisher[n], p))
                    anchors.append(use(anchor[n], p))
                yield ws, anchors

        return streamed_quadratic_penalty(self.ewc_lambda / 2.0, ps, terms())

    # ---- the Fisher -----------------------------------------------------------------------------

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """Estimate the finished task's Fisher and snapshot the anchor (online: fold into the running F)."""
        ctx = context
        if ctx is None or ctx.module is None or ctx.train_dataset is None or ctx.make_loader is None:
            raise ValueError(
                "EWC.on_task_end needs a TaskContext with module, train_dataset and make_loader, "
                f"got {ctx!r}."
            )
        policy = ctx.module.policy
        compute_loss = ctx.compute_loss or ctx.module.compute_loss
        params = trainable_parameters(policy)
        fisher = self.compute_fisher(policy, compute_loss, ctx.train_dataset, ctx.make_loader, params)
        anchor = {n: p.detach().clone() for n, p in params.items()}
        task_id = int(task_id)
        if self.mode == "online" and self._importance:
            (last,) = self._importance
            old_f, old_a = self._importance.pop(last), self._anchor.pop(last)
            for n, f in fisher.items():
                if n in old_f:
                    f.add_(self.placement.use(old_f[n], params[n]).to(f.dtype), alpha=self.gamma)
            # A parameter frozen since (PackNet) keeps its decayed importance and its old anchor.
            for n in old_f.keys() - fisher.keys():
                fisher[n], anchor[n] = old_f[n] * self.gamma, old_a[n]
        store = self.placement.store
        self._importance[task_id] = {n: store(f, params[n]) if n in params else f for n, f in fisher.items()}
        self._anchor[task_id] = {n: store(a, params[n]) if n in params else a for n, a in anchor.items()}

    def compute_fisher(
        self,
        policy: nn.Module,
        compute_loss: Callable[[dict], tuple[Tensor, dict]],
        dataset: Any,
        make_loader: Callable[..., Iterable[dict]],
        params: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Diagonal Fisher of ``params`` (default: the policy's trainable ones) on ``dataset``.

        ``compute_loss(raw_batch) -> (loss, outputs)`` is the run's preprocessing + forward pass.
        Returns tensors in the parameters' dtypes on their devices, identical on every DDP rank.
        """
        params = dict(trainable_parameters(policy) if params is None else params)
        if not params:
            return {}
        n = len(dataset)
        k = min(self.fisher_samples, n)
        if k == 0:
            raise ValueError("cannot compute a Fisher on an empty dataset; the task needs at least 1 frame.")
        # Evenly spaced frames: every episode of the task contributes, and no random draw to re-do on resume.
        positions = [(i * n) // k for i in range(k)]
        if any_sharded(list(params.values())):
            return self._sharded_fisher(policy, compute_loss, Subset(dataset, positions), make_loader, params)
        rank, world = rank_and_world()
        shard = Subset(dataset, positions[rank::world])
        loader = make_loader(shard, batch_size=self.fisher_batch_size, shuffle=False)

        any_p = next(iter(params.values()))
        acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32
        sums = {name: torch.zeros(p.shape, dtype=acc_dtype, device=p.device) for name, p in params.items()}
        count = 0
        with _fisher_mode(policy, any_p):
            for batch in loader:
                if self.fisher == "batch":
                    add_batch_square_grads(compute_loss, params, batch, sums)
                    count += 1
                else:
                    size, self._vmap_ok = add_per_sample_square_grads(
                        policy, compute_loss, params, batch, sums, self._vmap_ok
                    )
                    count += size

        # One flat all-reduce of every sum and the count: each rank ends with the global mean.
        flat = torch.cat(
            [s.reshape(-1).to(any_p.device) for s in sums.values()]
            + [torch.tensor([count], dtype=acc_dtype, device=any_p.device)]
        )
        if world > 1:
            dist.all_reduce(flat)
        total = float(flat[-1])
        if total <= 0:
            raise ValueError(f"the Fisher saw {total:g} samples; fisher_samples={self.fisher_samples}.")
        out: dict[str, Tensor] = {}
        offset = 0
        for name, p in params.items():
            size = p.numel()
            out[name] = (flat[offset : offset + size].view(p.shape) / total).to(
                device=p.device, dtype=p.dtype
            )
            offset += size
        return out

    def _sharded_fisher(
        self,
        policy: nn.Module,
        compute_loss: Callable[[dict], tuple[Tensor, dict]],
        frames: Any,
        make_loader: Callable[..., Iterable[dict]],
        params: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """The Fisher of an FSDP-sharded policy, held sharded like its parameters.

        FSDP averages every gradient over the ranks, so a per-sample gradient exists only when every
        rank runs the same sample: each rank runs every frame (``backward``, FSDP's hooks reduce-scatter
        it) and squares its own shard of the gradient. The frames and the mean are DDP's; the cost is one
        rank's share of the work on every rank.
        """
        loader = make_loader(frames, batch_size=self.fisher_batch_size, shuffle=False)
        sums = {name: torch.zeros_like(p.detach(), dtype=torch.float32) for name, p in params.items()}
        saved = {name: p.grad for name, p in params.items()}
        count = 0
        try:
            with _fisher_mode(policy, next(iter(params.values()))):
                for batch in loader:
                    size = batch_len(batch)
                    pieces = (
                        [batch]
                        if self.fisher == "batch"
                        else [slice_sample(batch, i, size) for i in range(size)]
                    )
                    for piece in pieces:
                        for p in params.values():
                            p.grad = None
                        compute_loss(piece)[0].mean().backward()
                        for name, p in params.items():
                            if p.grad is not None:
                                sums[name].add_(p.grad.detach().to(torch.float32).square())
                    count += 1 if self.fisher == "batch" else size
        finally:
            for name, p in params.items():
                p.grad = saved[name]
        if count <= 0:
            raise ValueError(f"the Fisher saw {count} samples; fisher_samples={self.fisher_samples}.")
        return {name: (s / count).to(params[name].dtype) for name, s in sums.items()}

    # ---- the seed's interface -------------------------------------------------------------------

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """No-op: the Fisher is estimated once per task, at its end, on the final parameters."""

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """Per-parameter importance: ``sum_t F_t`` (separate) or the running ``F`` (online); ``{}`` before
        any task ended. ``batch_size`` is ignored (the seed's signature)."""
        out: dict[str, Tensor] = {}
        for task in sorted(self._importance):
            for name, f in self._importance[task].items():
                out[name] = f.detach().clone() if name not in out else out[name] + f.to(out[name].device)
        return out

    @property
    def num_terms(self) -> int:
        """Penalty terms held: finished tasks (separate) or at most one (online)."""
        return len(self._importance)

    def anchors(self) -> dict[int, dict[str, Tensor]]:
        """Anchor parameters per term (task id -> name -> tensor); copies."""
        return {t: {n: a.detach().clone() for n, a in d.items()} for t, d in self._anchor.items()}

    def fishers(self) -> dict[int, dict[str, Tensor]]:
        """Fisher diagonal per term (task id -> name -> tensor); copies."""
        return {t: {n: f.detach().clone() for n, f in d.items()} for t, d in self._importance.items()}

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters plus every Fisher and anchor (CPU tensors), keyed by task id as a string."""

        def cpu(d: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {n: gathered(t) for n, t in d.items()}  # whole tensors, also from FSDP shards

        return {
            "name": self.name,
            "version": _STATE_VERSION,
            "mode": self.mode,
            "ewc_lambda": self.ewc_lambda,
            "gamma": self.gamma,
            "fisher": self.fisher,
            "fisher_samples": self.fisher_samples,
            "fisher_batch_size": self.fisher_batch_size,
            "state_dtype": self.placement.names[0],
            "state_device": self.placement.names[1],
            "importance": {str(t): cpu(d) for t, d in sorted(self._importance.items())},
            "anchor": {str(t): cpu(d) for t, d in sorted(self._anchor.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot exactly (hyperparameters included)."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state is for algorithm {state.get('name')!r}, not {self.name!r}.")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"unsupported EWC state version {state.get('version')!r}; expected 1.")
        hp = [
            state[k] for k in ("mode", "ewc_lambda", "gamma", "fisher", "fisher_samples", "fisher_batch_size")
        ]
        self._check_hparams(*hp)
        importance = {int(t): {n: v.clone() for n, v in d.items()} for t, d in state["importance"].items()}
        anchor = {int(t): {n: v.clone() for n, v in d.items()} for t, d in state["anchor"].items()}
        if importance.keys() != anchor.keys() or any(
            importance[t].keys() != anchor[t].keys() for t in anchor
        ):
            raise ValueError("EWC state has Fisher and anchor entries for different tasks or parameters.")
        if hp[0] == "online" and len(importance) > 1:
            raise ValueError(f"an online EWC state holds one term, this one holds {len(importance)}.")
        self.mode, self.fisher = str(hp[0]), str(hp[3])
        self.ewc_lambda, self.gamma = float(hp[1]), float(hp[2])
        self.fisher_samples, self.fisher_batch_size = int(hp[4]), int(hp[5])
        self._importance, self._anchor = importance, anchor

    def __repr__(self) -> str:
        return (
            f"EWC(mode={self.mode!r}, ewc_lambda={self.ewc_lambda}, gamma={self.gamma}, "
            f"fisher={self.fisher!r}, fisher_samples={self.fisher_samples}, terms={sorted(self._importance)})"
        )


__all__ = ["EWC"]
