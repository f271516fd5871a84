"""``c * sum_i w_i (theta_i - theta*_i)^2``, the penalty of EWC (w = Fisher) and SI (w = Omega), fused.

Written with per-tensor operations, the penalty and its backward are ~10 small kernels per parameter
tensor, each dispatched from Python and recorded in the autograd graph: on tiny_vla (50 tensors) that
alone made SI 1.38x and online EWC 1.15x the time of plain fine-tuning, far above their arithmetic.
Here one autograd node does the whole sum: the forward is four ``torch._foreach_*`` kernels over all
tensors at once, and the backward is the known gradient ``2 c w (theta - theta*)``, one more fused
kernel. Values and gradients are the same as the per-tensor form up to summation order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from cl_vla.algorithms.sharded import any_sharded, global_sum, local


class _FusedQuadratic(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        c: float,
        weights: Sequence[Tensor],
        anchors: Sequence[Tensor],
        keep: list[Tensor] | None,
        *params: Tensor,
    ) -> Tensor:
        diff = torch._foreach_sub(list(params), list(anchors))
        weighted = torch._foreach_mul(diff, list(weights))  # w (theta - theta*): the gradient's shape
        if keep is not None:
            keep.extend(weighted)
        torch._foreach_mul_(diff, weighted)  # w (theta - theta*)^2 >= 0 (w >= 0)
        # The L1 norm of a non-negative tensor is its sum: one fused reduction over every tensor.
        total = torch.stack(torch._foreach_norm(diff, 1)).sum()
        ctx.c, ctx.weighted = c, weighted
        return total * c

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = torch._foreach_mul(ctx.weighted, grad_out * (2.0 * ctx.c))
        ctx.weighted = None
        return (None, None, None, None, *grads)


class _StreamedQuadratic(torch.autograd.Function):
    """``c * sum_t sum_i w_t,i (theta_i - theta*_t,i)^2`` over terms that arrive one at a time (state kept
    off the device): each term's weights and anchors are used and dropped, and only the gradient's
    running sum ``sum_t w_t (theta - theta*_t)`` (one tensor per parameter) is kept for the backward."""

    @staticmethod
    def forward(ctx, c: float, terms: Iterable[tuple[list[Tensor], list[Tensor]]], *params: Tensor) -> Tensor:
        grad_sum = [torch.zeros_like(p) for p in params]
        total = params[0].new_zeros(())
        for weights, anchors in terms:
            diff = torch._foreach_sub(list(params), anchors)
            weighted = torch._foreach_mul(diff, weights)
            torch._foreach_add_(grad_sum, weighted)
            torch._foreach_mul_(diff, weighted)
            total = total + torch.stack(torch._foreach_norm(diff, 1)).sum()
        ctx.c, ctx.grad_sum = c, grad_sum
        return total * c

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = torch._foreach_mul(ctx.grad_sum, grad_out * (2.0 * ctx.c))
        ctx.grad_sum = None
        return (None, None, *grads)


def streamed_quadratic_penalty(
    c: float, params: Sequence[Tensor], terms: Iterable[tuple[list[Tensor], list[Tensor]]]
) -> Tensor:
    """The sum of :func:`quadratic_penalty` over ``terms`` (``(weights, anchors)`` lists matching
    ``params``, each ready on the parameters' device and dtype), with one term on the device at a time:
    for state kept in host memory (``algorithm.state_device=cpu``). Same value and gradient up to the
    order of summation."""
    if not params:
        raise ValueError("streamed_quadratic_penalty needs at least one parameter.")
    return _StreamedQuadratic.apply(float(c), terms, *params)


def quadratic_penalty(
    c: float,
    params: Sequence[Tensor],
    weights: Sequence[Tensor],
    anchors: Sequence[Tensor],
    keep: list[Tensor] | None = None,
) -> Tensor:
    """``c * sum_i sum(w_i * (params_i - anchors_i)^2)``, differentiable in ``params``; ``w >= 0``.

    ``weights`` and ``anchors`` must match ``params`` in shape, dtype and device (callers move their
    state once). Falls back to per-tensor arithmetic when dtypes differ across tensors, which the fused
    kernels do not mix. Sharded (FSDP) parameters, weights and anchors give the global penalty from
    local sums and one all-reduce (:mod:`cl_vla.algorithms.sharded`). With ``keep`` (an empty list), the
    fused path appends ``w_i (params_i - anchors_i)`` to it, detached: half the penalty's gradient,
    which SI needs again after backward.
    """
    if not params:
        raise ValueError("quadratic_penalty needs at least one parameter.")
    if any_sharded(params):
        # FSDP: each rank sums its shards' terms (gradients reach the sharded parameters through
        # ``to_local``), then one all-reduce of the scalar gives every rank the whole penalty.
        part = quadratic_penalty(
            c, [local(p) for p in params], [local(w) for w in weights], [local(a) for a in anchors], keep
        )
        return global_sum(part, sharded=True)
    if len({p.dtype for p in params}) > 1:
        terms = [(w * (p - a).square()).sum() for p, w, a in zip(params, weights, anchors, strict=True)]
        return sum(terms[1:], terms[0]) * c
    return _FusedQuadratic.apply(float(c), list(weights), list(anchors), keep, *params)
