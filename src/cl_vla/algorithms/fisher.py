"""The diagonal Fisher information's building blocks, for EWC (:mod:`cl_vla.algorithms.ewc`).

Squared gradients of the policy's training loss, summed into per-parameter accumulators: of whole
mini-batches (:func:`add_batch_square_grads`) or of every sample (:func:`add_per_sample_square_grads`,
with ``torch.func`` where the policy can be traced, else a loop). EWC averages the sums over the
frames it draws and over DDP ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def slice_sample(batch: Mapping[str, Any], i: int, size: int) -> dict[str, Any]:
    """Sample ``i`` of a collated batch as a batch of one (tensors and per-sample lists are sliced)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size:
            out[k] = v[i : i + 1]
        elif isinstance(v, list | tuple) and len(v) == size:
            out[k] = type(v)([v[i]]) if isinstance(v, list) else (v[i],)
        else:
            out[k] = v
    return out


def batch_len(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    for v in batch.values():
        if isinstance(v, list | tuple):
            return len(v)
    raise ValueError("cannot find the batch size of a Fisher batch: it holds no tensor and no list.")


class _LossOf(nn.Module):
    """Holds the policy as a submodule so ``functional_call`` can swap its parameters while the run's
    own ``compute_loss`` (preprocessor + policy forward) is what gets differentiated."""

    def __init__(self, policy: nn.Module, compute_loss: Callable[[dict], tuple[Tensor, dict]]) -> None:
        super().__init__()
        self.policy = policy
        self._compute_loss = compute_loss

    def forward(self, batch: dict) -> Tensor:
        return self._compute_loss(batch)[0].mean()


def add_batch_square_grads(
    compute_loss: Callable, params: Mapping[str, Tensor], batch: dict, sums: dict[str, Tensor]
) -> None:
    """Add the squared gradient of ``batch``'s mean loss to ``sums`` (the ``fisher="batch"`` estimate)."""
    loss = compute_loss(batch)[0].mean()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for name, g in zip(params, grads, strict=True):
        if g is not None:
            sums[name].add_(g.detach().to(sums[name].dtype).square())


def add_per_sample_square_grads(
    policy: nn.Module,
    compute_loss: Callable,
    params: Mapping[str, Tensor],
    batch: dict,
    sums: dict[str, Tensor],
    try_vmap: bool = True,
) -> tuple[int, bool]:
    """Add every sample's squared gradient to ``sums``; returns ``(samples, vmap still usable)``.

    With ``try_vmap`` the gradients come from ``torch.func`` (:func:`vmap_square_grads`); when tracing
    fails, one warning is issued, ``False`` is returned for the caller to keep, and a loop of
    single-sample gradient passes gives the same numbers more slowly.
    """
    size = batch_len(batch)
    if try_vmap:
        # A failed attempt may have drawn random numbers (a flow-matching VLA's loss samples noise):
        # the loop starts from the same state, so a resumed run (which tries vmap again) draws what
        # the uninterrupted run (which had stopped trying) drew.
        rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            chunk = vmap_square_grads(policy, compute_loss, params, batch, size)
        except Exception as e:  # any tracing failure means: use the loop
            torch.random.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            try_vmap = False
            warnings.warn(
                f"EWC: per-sample gradients with torch.func.vmap failed on this policy "
                f"({type(e).__name__}: {str(e)[:120]}...); "
                "using a loop of single-sample gradients instead (same Fisher, slower).",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            for name, s in chunk.items():
                sums[name].add_(s.to(sums[name].dtype))
            return size, True
    names, tensors = list(params), list(params.values())
    for i in range(size):
        loss = compute_loss(slice_sample(batch, i, size))[0].mean()
        # autograd.grad, not backward: .grad stays untouched and DDP's gradient hooks never fire.
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for name, g in zip(names, grads, strict=True):
            if g is not None:
                sums[name].add_(g.detach().to(sums[name].dtype).square())
    return size, try_vmap


def vmap_square_grads(
    policy: nn.Module, compute_loss: Callable, params: Mapping[str, Tensor], batch: dict, size: int
) -> dict[str, Tensor]:
    """Sum over the batch of squared per-sample gradients, with ``torch.func``.

    ``vmap`` maps over tensors only, so samples are grouped by their non-tensor per-sample fields (the
    instruction string): within one group those fields are constants of the traced function. A task's
    frames share one instruction, so this is normally a single group.
    """
    from torch.func import functional_call, grad, vmap

    wrapper = _LossOf(policy, compute_loss)
    prefixed = {f"policy.{n}": p.detach() for n, p in params.items()}
    tensor_keys = [
        k for k, v in batch.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size
    ]
    list_keys = [k for k, v in batch.items() if isinstance(v, list | tuple) and len(v) == size]
    constants = {k: v for k, v in batch.items() if k not in tensor_keys and k not in list_keys}
    groups: dict[tuple, list[int]] = {}
    for i in range(size):
        groups.setdefault(tuple(repr(batch[k][i]) for k in list_keys), []).append(i)

    out = {
        n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params.items()
    }
    for idx in groups.values():
        fixed = {**constants, **{k: [batch[k][idx[0]]] for k in list_keys}}

        def loss_one(p: dict[str, Tensor], sample: dict[str, Tensor], fixed: dict = fixed) -> Tensor:
            return functional_call(wrapper, p, ({**{k: v.unsqueeze(0) for k, v in sample.items()}, **fixed},))

        rows = torch.tensor(idx, device=batch[tensor_keys[0]].device) if tensor_keys else None
        samples = {k: batch[k].index_select(0, rows.to(batch[k].device)) for k in tensor_keys}
        grads = vmap(grad(loss_one), in_dims=(None, 0), randomness="different")(prefixed, samples)
        for n in params:
            out[n].add_(grads[f"policy.{n}"].detach().to(out[n].dtype).square().sum(0))
    return out


__all__ = [
    "add_batch_square_grads",
    "add_per_sample_square_grads",
    "batch_len",
    "slice_sample",
    "vmap_square_grads",
]
