"""PackNet's per-element owner masks (:mod:`cl_vla.algorithms.packnet`): which weights carry one,
how a layer's free weights are pruned at a task's end, which elements a task keeps, and how frozen
elements are held still while other elements train.

An owner mask is a uint8 tensor shaped like its weight: 0 = free, ``k + 1`` = owned by task ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

MAX_TASKS = 254  # owners are uint8 and 0 means free

#: Parameter name -> (the multiplier that keeps the trainable elements: 1 where an element trains, 0
#: where it is frozen, in the parameter's dtype; None for a whole frozen tensor, the frozen values: the
#: frozen elements' values with zeros elsewhere, or the whole tensor). Float multipliers, not boolean
#: masks: on a CPU ``masked_fill_``/``masked_scatter_`` take 4-7 ms a step on tiny_vla's 1.1 M weights
#: (bool-mask kernels), a multiply and an add 0.3 ms (docs/bench.md, PackNet).
Snapshot = dict[str, tuple[torch.Tensor | None, torch.Tensor]]

# _ConvNd is the base of Conv1d/2d/3d and ConvTranspose1d/2d/3d.
_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def prunable_parameter_names(policy: nn.Module) -> list[str]:
    """Names (as in ``policy.named_parameters()``) of the trainable linear / conv weight matrices."""
    names: list[str] = []
    for mod_name, mod in policy.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, _LAYER_TYPES):
            attrs: tuple[str, ...] = ("weight",)
        elif isinstance(mod, nn.MultiheadAttention):
            attrs = _MHA_WEIGHTS
        else:
            continue
        for attr in attrs:
            p = getattr(mod, attr, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                names.append(prefix + attr)
    # A parameter shared by two modules appears once, in order.
    return list(dict.fromkeys(names))


@torch.no_grad()
def prune_layer(weight: torch.Tensor, owner: torch.Tensor, prune_ratio: float, owner_value: int) -> None:
    """In place: zero the ``prune_ratio`` smallest-magnitude free elements of ``weight`` (they stay
    free) and give the other free ones to ``owner_value``."""
    idx = (owner.view(-1) == 0).nonzero().squeeze(1)
    n_prune = round(prune_ratio * idx.numel())
    # A stable sort makes ties (e.g. weights already at zero) deterministic on every rank.
    order = torch.sort(weight.detach().reshape(-1)[idx].abs(), stable=True).indices
    pruned = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    pruned[idx[order[:n_prune]]] = True
    owner.view(-1)[idx[order[n_prune:]]] = owner_value
    weight.masked_fill_(pruned.view(weight.shape), 0.0)


def keep_mask(owner: torch.Tensor, task_id: int, pruned: bool) -> torch.Tensor:
    """Elements task ``task_id`` uses: those owned by it or earlier tasks, plus the free ones while
    the task is not ``pruned`` yet (bool, shaped like ``owner``)."""
    # Clamped: a uint8 comparison with a larger Python int would wrap around.
    keep = (owner != 0) & (owner <= min(task_id + 1, 255))
    if not pruned:
        keep |= owner == 0
    return keep


def frozen_entry(p: torch.Tensor, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A :data:`Snapshot` entry that holds ``p``'s elements where ``frozen`` (bool) is True."""
    values = p.detach().masked_fill(~frozen, 0.0)  # exactly p where frozen, 0 elsewhere
    return (~frozen).to(p.dtype), values


@torch.no_grad()
def frozen_snapshot(
    params: Mapping[str, torch.Tensor], owners: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]
) -> Snapshot:
    """The owned (non-free) elements of ``params`` and every tensor of ``shared``, with their values."""
    snap: Snapshot = {}
    for name, p in params.items():
        frozen = owners[name] != 0
        if bool(frozen.any()):
            snap[name] = frozen_entry(p, frozen)
    for name, p in shared.items():
        snap[name] = (None, p.detach().clone())
    return snap


def _split(params: Mapping[str, torch.Tensor], snapshot: Snapshot, grads: bool):
    """(tensors with a multiplier, their multipliers, their values), (whole frozen tensors, values)."""
    part, keep, values, whole, whole_values = [], [], [], [], []
    for name, (free, value) in snapshot.items():
        t = params[name].grad if grads else params[name]
        if t is None:
            continue
        if free is None:
            whole.append(t)
            whole_values.append(value)
        else:
            part.append(t)
            keep.append(free)
            values.append(value)
    return (part, keep, values), (whole, whole_values)


@torch.no_grad()
def zero_frozen_grads(params: Mapping[str, torch.Tensor], snapshot: Snapshot) -> None:
    """Zero the gradients of the elements ``snapshot`` holds frozen (a non-finite gradient there stays
    non-finite: the step is broken for every weight then, and an AMP scaler skips it)."""
    (grads, keep, _), (whole, _) = _split(params, snapshot, grads=True)
    if grads:
        torch._foreach_mul_(grads, keep)
    for g in whole:
        g.zero_()


@torch.no_grad()
def restore_frozen(params: Mapping[str, torch.Tensor], snapshot: Snapshot) -> None:
    """Put the frozen elements' values back: ``p * keep + values`` is exactly the frozen value where
    ``keep`` is 0 (``p`` finite there: its gradient was zeroed, so only a diverged step makes it not)
    and exactly ``p`` where it is 1; only the sign of a zero may change."""
    (ps, keep, values), (whole, whole_values) = _split(params, snapshot, grads=False)
    if ps:
        torch._foreach_mul_(ps, keep)
        torch._foreach_add_(ps, values)
    for p, v in zip(whole, whole_values, strict=True):
        p.copy_(v)


__all__ = [
    "MAX_TASKS",
    "Snapshot",
    "frozen_entry",
    "frozen_snapshot",
    "keep_mask",
    "prunable_parameter_names",
    "prune_layer",
    "restore_frozen",
    "zero_frozen_grads",
]
