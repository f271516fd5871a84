"""PackNet (Mallya & Lazebnik, CVPR 2018): iterative pruning packs several tasks into one network.

Weight matrices of the policy's linear and convolutional layers (``nn.Linear``, ``nn.ConvNd``,
``nn.ConvTransposeNd`` and ``nn.MultiheadAttention``'s input projections) carry an owner per element
(uint8: 0 = free, ``k + 1`` = task ``k``):

- **training task t**: only free elements learn. The gradients of owned elements are zeroed in
  ``after_backward``, and, since AdamW's weight decay and moments carried from earlier steps would
  still move them, their values are restored bit-exactly after every optimizer step (``observe``)
  from a snapshot taken at the first backward of each fit (after Lightning restored the weights on
  a resume). The optimizer keeps its per-tensor param groups; the masks are per element.
- **end of task t** (``on_task_end``): per layer, the ``prune_ratio`` smallest-magnitude free
  elements are pruned (set to 0 and left free for later tasks), the others become task t's and are
  frozen from now on. The paper then re-trains the kept weights briefly; ``finetune_steps`` does that
  (only task t's elements move), 0 by default because on a CPU it doubles a short task's cost.
- **evaluating task j** (``eval_context``): elements owned by later tasks are zeroed, and so are free
  ones when task j has been pruned, so task j sees exactly the network it ended with; the values are
  put back afterwards. A task not pruned yet (being trained, or unseen) is evaluated with every owned
  element plus the free ones, i.e. the network as it is.

Every other trainable parameter (biases, normalization layers, embeddings, learned queries) is shared:
following the paper it trains with the first task only and is frozen afterwards
(``shared_params="first_task"``); ``"never"`` freezes it from the start, as LIBERO's baseline does.

PackNet needs the task identity at evaluation: once a task has been pruned, running the policy in eval
mode outside ``eval_context(task_id, module)`` raises an error instead of silently mixing every task's
weights. The mask math (pruning, what a task keeps, frozen snapshots) is in
:mod:`cl_vla.algorithms.packnet_masks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from cl_vla.algorithms.base import CLAlgorithm, TaskContext, rank_and_world, to_device
from cl_vla.algorithms.packnet_masks import (
    MAX_TASKS,
    Snapshot,
    frozen_entry,
    frozen_snapshot,
    keep_mask,
    prunable_parameter_names,
    prune_layer,
    restore_frozen,
    zero_frozen_grads,
)

_STATE_VERSION = 1
_FINETUNE_STREAM = 21
_SHARED_CHOICES = ("first_task", "never")


class PackNet(CLAlgorithm):
    """Per-task weight masks by iterative magnitude pruning; needs the task id at evaluation.

    Args:
        prune_ratio: Share of each layer's free weights pruned (released) after a task, in (0, 1);
            LIBERO's PackNet baseline uses 0.75.
        finetune_steps: Optimizer steps re-training task t's kept weights after pruning (the paper's
            post-pruning fine-tuning; LIBERO runs 50 epochs). 0 skips it.
        finetune_batch_size: Batch size of those steps.
        finetune_lr: Their AdamW learning rate; ``None`` takes the module's ``lr``.
        shared_params: ``"first_task"`` (train biases / norms / embeddings with task 0, then freeze)
            or ``"never"`` (frozen from the start).
        seed: Seeds the fine-tuning batches.
    """

    name = "packnet"

    def __init__(
        self,
        prune_ratio: float = 0.75,
        finetune_steps: int = 0,
        finetune_batch_size: int = 32,
        finetune_lr: float | None = None,
        shared_params: str = "first_task",
        seed: int = 0,
    ) -> None:
        self._check_hparams(prune_ratio, finetune_steps, finetune_batch_size, finetune_lr, shared_params)
        self.prune_ratio = float(prune_ratio)
        self.finetune_steps = int(finetune_steps)
        self.finetune_batch_size = int(finetune_batch_size)
        self.finetune_lr = None if finetune_lr is None else float(finetune_lr)
        self.shared_params = str(shared_params)
        self.seed = int(seed)
        #: Owner of every element of every prunable weight, by parameter name (uint8, 0 = free).
        self._owners: dict[str, torch.Tensor] = {}
        #: Tasks pruned so far, in order (their owner value is ``task + 1``).
        self.pruned_tasks: list[int] = []
        self._module: Any = None
        self._policy: nn.Module | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._shared: dict[str, nn.Parameter] = {}
        # What stays frozen and its values (see packnet_masks.frozen_snapshot); None: take it lazily.
        self._snapshot: Snapshot | None = None
        self._eval_depth = 0
        self._hooks: list[Any] = []

    @staticmethod
    def _check_hparams(
        prune_ratio: Any, finetune_steps: Any, finetune_batch_size: Any, finetune_lr: Any, shared_params: Any
    ) -> None:
        try:
            ratio_ok = not isinstance(prune_ratio, bool) and 0.0 < float(prune_ratio) < 1.0
        except (TypeError, ValueError):
            ratio_ok = False
        if not ratio_ok:
            raise ValueError(f"prune_ratio must be in (0, 1), got {prune_ratio!r}.")
        if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
            raise ValueError(f"finetune_steps must be an int >= 0, got {finetune_steps!r}.")
        if (
            isinstance(finetune_batch_size, bool)
            or not isinstance(finetune_batch_size, int)
            or finetune_batch_size <= 0
        ):
            raise ValueError(f"finetune_batch_size must be a positive int, got {finetune_batch_size!r}.")
        if finetune_lr is not None:
            try:
                lr_ok = not isinstance(finetune_lr, bool) and math.isfinite(float(finetune_lr))
                lr_ok = lr_ok and float(finetune_lr) > 0
            except (TypeError, ValueError):
                lr_ok = False
            if not lr_ok:
                raise ValueError(f"finetune_lr must be a positive number or null, got {finetune_lr!r}.")
        if shared_params not in _SHARED_CHOICES:
            raise ValueError(f"shared_params must be one of {list(_SHARED_CHOICES)}, got {shared_params!r}.")

    # ---- wiring ---------------------------------------------------------------------------------

    def setup(self, module: Any) -> None:
        """Find the prunable weights, create (or check restored) owner masks, arm the eval guard."""
        policy = getattr(module, "policy", module)
        named = dict(policy.named_parameters())
        names = prunable_parameter_names(policy)
        if self._owners and set(self._owners) != set(names):
            extra, missing = sorted(set(self._owners) - set(names)), sorted(set(names) - set(self._owners))
            raise ValueError(
                f"PackNet's saved masks do not match the policy (unknown {extra[:3]}, missing "
                f"{missing[:3]}); resume with the model the run was started with."
            )
        for name in names:
            p = named[name]
            owner = self._owners.get(name)
            if owner is None:
                owner = torch.zeros(p.shape, dtype=torch.uint8)
            elif owner.shape != p.shape:
                raise ValueError(
                    f"PackNet's saved mask for {name} has shape {tuple(owner.shape)} but the weight has "
                    f"{tuple(p.shape)}; resume with the model the run was started with."
                )
            self._owners[name] = owner.to(device=p.device, dtype=torch.uint8).contiguous()
        self._module = module
        self._policy = policy
        self._params = {n: named[n] for n in names}
        self._shared = {n: p for n, p in named.items() if p.requires_grad and n not in self._params}
        self._snapshot = None
        for handle in self._hooks:
            handle.remove()
        # Only layers holding a masked weight: a frozen backbone a policy keeps in eval mode while
        # training (SmolVLA's vision encoder, say) must not trip the guard.
        masked = {id(p) for p in self._params.values()}
        self._hooks = [
            m.register_forward_pre_hook(self._guard)
            for m in policy.modules()
            if any(id(p) in masked for p in m.parameters(recurse=False))
        ]

    def _guard(self, mod: nn.Module, args: Any) -> None:
        if self.pruned_tasks and not mod.training and self._eval_depth == 0:
            raise RuntimeError(
                "PackNet needs the task identity at evaluation: run the policy inside "
                "algorithm.eval_context(task_id, module) so it uses that task's weights."
            )

    def _require_setup(self) -> None:
        if self._policy is None:
            raise RuntimeError("PackNet.setup(module) must be called before training or evaluating.")

    def _shared_frozen(self) -> bool:
        return self.shared_params == "never" or bool(self.pruned_tasks)

    # ---- training -------------------------------------------------------------------------------

    def _take_snapshot(self) -> None:
        shared = self._shared if self._shared_frozen() else {}
        self._snapshot = frozen_snapshot(self._params, self._owners, shared)

    def _all_params(self) -> dict[str, nn.Parameter]:
        return {**self._params, **self._shared}

    def after_backward(self, module: Any, batch: Mapping[str, Any]) -> None:
        """Zero the gradients of frozen elements (earlier tasks' weights, shared params after task 0)."""
        self._require_setup()
        if self._snapshot is None:
            # The first backward of a fit: the weights are the ones to keep (restored on a resume).
            self._take_snapshot()
        zero_frozen_grads(self._all_params(), self._snapshot)

    def _restore(self) -> None:
        if self._snapshot is not None:
            restore_frozen(self._all_params(), self._snapshot)

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """After the optimizer step: put frozen elements back (weight decay and Adam moments move them)."""
        self._restore()

    def on_task_start(self, task_id: int, context: TaskContext | None = None) -> None:
        self._require_setup()
        self._snapshot = None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and hyperparameters exactly; call :meth:`setup` afterwards (the loop does)."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state is for algorithm {state.get('name')!r}, not {self.name!r}.")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"unsupported packnet state version {state.get('version')!r}; expected 1.")
        hp = state["hparams"]
        self._check_hparams(
            hp["prune_ratio"],
            hp["finetune_steps"],
            hp["finetune_batch_size"],
            hp["finetune_lr"],
            hp["shared_params"],
        )
        owners = {}
        for name, owner in state["owners"].items():
            if not isinstance(owner, torch.Tensor) or owner.dtype != torch.uint8:
                raise ValueError(
                    f"PackNet's saved mask for {name} must be a uint8 tensor, got {type(owner)}."
                )
            owners[name] = owner.clone()
        pruned = [int(t) for t in state["pruned_tasks"]]
        self.prune_ratio = float(hp["prune_ratio"])
        self.finetune_steps = int(hp["finetune_steps"])
        self.finetune_batch_size = int(hp["finetune_batch_size"])
        self.finetune_lr = None if hp["finetune_lr"] is None else float(hp["finetune_lr"])
        self.shared_params = str(hp["shared_params"])
        self.seed = int(hp["seed"])
        self.pruned_tasks = pruned
        self._owners = owners
        self._snapshot = None
        if self._module is not None:
            self.setup(self._module)

    # ---- pruning --------------------------------------------------------------------------------

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """Prune task ``task_id``'s weights, give it the rest, optionally fine-tune them."""
        self._require_setup()
        if isinstance(task_id, bool) or not isinstance(task_id, int | np.integer) or task_id < 0:
            raise ValueError(f"task_id must be a non-negative int, got {task_id!r}.")
        task_id = int(task_id)
        if task_id in self.pruned_tasks:
            return  # already pruned (a hook called twice must not prune the kept weights again)
        if task_id >= MAX_TASKS:
            raise ValueError(f"PackNet supports task ids below {MAX_TASKS}, got {task_id}.")
        self._restore()  # the last step's update is already undone, but be safe for direct callers
        self.prune(task_id)
        if self.finetune_steps > 0 and context is not None and context.train_dataset is not None:
            self._finetune(task_id, context)
        self._snapshot = None

    @torch.no_grad()
    def prune(self, task_id: int) -> None:
        """Per layer, zero the ``prune_ratio`` smallest free weights; the other free ones go to the task."""
        for name, p in self._params.items():
            prune_layer(p, self._owners[name], self.prune_ratio, int(task_id) + 1)
        self.pruned_tasks.append(int(task_id))

    def _finetune(self, task_id: int, ctx: TaskContext) -> None:
        """Re-train only ``task_id``'s kept weights on its data (everything else restored every step)."""
        policy = self._policy
        module = ctx.module if ctx.module is not None else policy
        compute_loss = ctx.compute_loss or module.compute_loss
        owner_value = task_id + 1
        params = list(self._params.values())
        masks = [self._owners[n] == owner_value for n in self._params]
        # Everything but task_id's elements (earlier tasks', pruned zeros, shared params) is kept.
        self._snapshot = {
            n: frozen_entry(p, ~m) for (n, p), m in zip(self._params.items(), masks, strict=True)
        }
        self._snapshot.update({n: (None, p.detach().clone()) for n, p in self._shared.items()})
        lr = self.finetune_lr if self.finetune_lr is not None else float(getattr(module, "lr", 1e-4))
        wd = float(getattr(module, "weight_decay", 0.0))
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        rank, world = rank_and_world()
        n = len(ctx.train_dataset)
        rng = np.random.default_rng([self.seed % (1 << 64), _FINETUNE_STREAM, task_id, rank])
        bs = self.finetune_batch_size
        batches = [
            [int(i) for i in rng.choice(n, size=bs, replace=bs > n)] for _ in range(self.finetune_steps)
        ]
        # Imported here: the data module brings Lightning, which ``import cl_vla`` does not load.
        from cl_vla.data.datamodule import ListBatchSampler

        sampler = ListBatchSampler(batches)
        loader = (
            ctx.make_loader(ctx.train_dataset, batch_sampler=sampler)
            if ctx.make_loader is not None
            else DataLoader(ctx.train_dataset, batch_sampler=sampler)
        )
        device = params[0].device if params else ctx.device
        was_training = policy.training
        policy.train()
        try:
            for raw in loader:
                with torch.enable_grad():
                    loss, _ = compute_loss(to_device(raw, device))
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g, m in zip(params, grads, masks, strict=True):
                    g = torch.zeros_like(p) if g is None else g.masked_fill(~m, 0.0)
                    if world > 1:
                        # Outside Lightning's DDP wrapper: average by hand so replicas stay equal.
                        dist.all_reduce(g, op=dist.ReduceOp.SUM)
                        g /= world
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                self._restore()
        finally:
            policy.train(was_training)

    # ---- evaluation -----------------------------------------------------------------------------

    def eval_context(self, task_id: int, module: Any) -> AbstractContextManager:
        """Task ``task_id``'s network: elements of later tasks (and free ones once it is pruned) zeroed."""
        if task_id is None or isinstance(task_id, bool) or not isinstance(task_id, int | np.integer):
            raise ValueError(
                f"PackNet needs the task identity at evaluation (an int task_id), got {task_id!r}."
            )
        return self._masked(int(task_id))

    def keep_mask(self, name: str, task_id: int) -> torch.Tensor:
        """Which elements of weight ``name`` task ``task_id`` uses (bool, shaped like the weight)."""
        return keep_mask(self._owners[name], task_id, pruned=task_id in self.pruned_tasks)

    @contextmanager
    def _masked(self, task_id: int) -> Iterator[None]:
        self._require_setup()
        saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for name, p in self._params.items():
                    drop = ~self.keep_mask(name, task_id)
                    if bool(drop.any()):
                        saved.append((p, drop, p.detach()[drop].clone()))
                        p.masked_fill_(drop, 0.0)
            self._eval_depth += 1
            yield
        finally:
            self._eval_depth = max(0, self._eval_depth - 1)
            with torch.no_grad():
                for p, drop, values in saved:
                    p.masked_scatter_(drop, values)

    # ---- checkpointing -----------------------------------------------------------

    def owners(self) -> dict[str, torch.Tensor]:
        """Owner masks by parameter name (uint8; 0 free, ``k + 1`` task ``k``), as live tensors."""
        return dict(self._owners)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, pruned tasks and the uint8 owner masks (CPU copies)."""
        return {
            "name": self.name,
            "version": _STATE_VERSION,
            "hparams": {
                "prune_ratio": self.prune_ratio,
                "finetune_steps": self.finetune_steps,
                "finetune_batch_size": self.finetune_batch_size,
                "finetune_lr": self.finetune_lr,
                "shared_params": self.shared_params,
                "seed": self.seed,
            },
            "pruned_tasks": list(self.pruned_tasks),
            "owners": {n: o.detach().cpu().clone() for n, o in self._owners.items()},
        }

    def __repr__(self) -> str:
        return (
            f"PackNet(prune_ratio={self.prune_ratio}, finetune_steps={self.finetune_steps}, "
            f"shared_params={self.shared_params!r}, pruned_tasks={self.pruned_tasks})"
        )


__all__ = ["PackNet"]
