"""Gradients as flat vectors and GEM's projection of one against past tasks' gradients.

Shared by GEM (:mod:`cl_vla.algorithms.gem`) and A-GEM (:mod:`cl_vla.algorithms.agem`, whose own
one-constraint projection stays beside it). :func:`gem_project` is pure math, tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from cl_vla.algorithms.sharded import local


def non_negative_float(name: str, value: Any) -> float:
    """``float(value)``, or a ValueError naming ``name`` when it is not a finite number >= 0."""
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value)) and float(value) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def gem_project(
    g: torch.Tensor,
    G: torch.Tensor,
    margin: float = 0.0,
    reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduce,
) -> torch.Tensor:
    """GEM's projection of the gradient ``g`` (shape ``(n,)``) against past gradients ``G`` (``(K, n)``).

    Returns ``g`` itself when ``G @ g >= 0`` already holds. Otherwise returns ``g + G^T v`` with ``v``
    the solution of the dual QP ``min 1/2 v^T G G^T v + g^T G^T v`` subject to ``v >= margin``: for
    ``margin = 0`` the closest vector to ``g`` with ``G @ g~ >= 0``; for ``margin > 0`` the closest such
    vector to ``g + margin * G^T 1``. The K x K dual is solved exactly as non-negative least squares on
    a square root of ``G G^T`` (rank-deficient ``G``, e.g. two equal past gradients, is fine).

    ``reduce`` completes partial inner products: under FSDP ``g`` and ``G`` are this rank's shards of
    the vectors, ``G @ g`` and ``G @ G^T`` are local sums and ``reduce`` all-reduces them (one collective
    of K + K^2 numbers); the K x K problem is then the same on every rank and ``g + G^T v`` local.
    """
    if G.ndim != 2 or g.ndim != 1 or G.shape[1] != g.shape[0]:
        raise ValueError(
            f"gem_project needs g of shape (n,) and G of shape (K, n), got {g.shape} and {G.shape}."
        )
    margin = non_negative_float("margin", margin)
    if G.shape[0] == 0:
        return g
    K = G.shape[0]
    both = reduce(torch.cat([G @ g, (G @ G.T).reshape(-1)]))
    dots, gram_t = both[:K], both[K:].view(K, K)
    if not bool((dots < 0).any()):
        return g
    gram = gram_t.double().cpu().numpy()
    gram = 0.5 * (gram + gram.T)
    # Shift v = margin + w (w >= 0): the linear term becomes G (g + margin G^T 1).
    c = dots.double().cpu().numpy() + margin * gram.sum(axis=1)
    lam, U = np.linalg.eigh(gram)
    keep = lam > max(float(lam.max()), 0.0) * 1e-10
    if not keep.any():  # every past gradient is zero: nothing constrains g
        return g
    # With gram = A^T A (A = sqrt(lam) U^T), 1/2 w^T gram w + c^T w = 1/2 |A w - b|^2 + const for
    # A^T b = -c; c lies in the range of gram (it is G times a vector), so b exists.
    A = np.sqrt(lam[keep])[:, None] * U[:, keep].T
    b = -(U[:, keep].T @ c) / np.sqrt(lam[keep])
    w, _ = nnls(A, b, maxiter=50 * max(10, G.shape[0]))
    v = torch.as_tensor(w + margin, dtype=G.dtype, device=G.device)
    return g + G.T @ v


def flat_grad(
    params: Sequence[torch.Tensor], grads: Iterable[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """``params``' gradients (``.grad`` unless ``grads`` is given) as one vector; ``None`` counts as 0."""
    grads = [p.grad for p in params] if grads is None else list(grads)
    # FSDP: this rank's shards (``local`` is the identity for plain tensors).
    return torch.cat(
        [
            (torch.zeros_like(local(p)) if gr is None else local(gr)).reshape(-1)
            for p, gr in zip(params, grads, strict=True)
        ]
    )


def write_flat_grad(params: Sequence[torch.Tensor], vector: torch.Tensor) -> None:
    """Copy ``vector`` into ``params``' ``.grad`` in place (creating missing ones); under FSDP
    ``vector`` is this rank's shards, as :func:`flat_grad` gave them."""
    offset = 0
    for p in params:
        shard = local(p)
        n = shard.numel()
        chunk = vector[offset : offset + n].view_as(shard)
        if p.grad is None:
            p.grad = torch.zeros_like(p.detach())  # sharded like ``p`` under FSDP
        local(p.grad).copy_(chunk)
        offset += n


__all__ = ["flat_grad", "gem_project", "non_negative_float", "write_flat_grad"]
