"""Per-parameter CL state held exactly like its parameter, sharded or not.

Under FSDP (``trainer.strategy=fsdp``) a policy's parameters are ``DTensor`` shards: rank ``r`` holds
rows ``r/N`` of each. An algorithm's per-parameter tensors (EWC's Fisher and anchor, SI's path
integrals) are made from those parameters (``p.detach().clone()``, ``torch.zeros_like(p)``...) and so
are ``DTensor`` shards with the same placement: each rank holds 1/N of the state and no rank builds a
full copy while training. Reductions over whole vectors (a penalty's sum) are local partial sums plus one
all-reduce of a scalar. Only a checkpoint gathers the full tensors (:func:`gathered`), on the CPU, to
write the one file every strategy writes; a restored state is sharded again, locally, by :func:`like`.

Without FSDP every function here is the plain tensor operation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (differentiable: gradients reach the sharded parameter)."""
    return t.to_local() if is_dtensor(t) else t


def like(t: Tensor, p: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` placed as parameter ``p`` is: on its device, in ``dtype`` (default ``p``'s), and sharded like
    ``p`` when ``p`` is a shard. ``t`` is either already placed so (returned as is) or the full tensor (a
    restored state), which each rank cuts locally: no communication, and only this rank's part is kept."""
    dtype = p.dtype if dtype is None else dtype
    if is_dtensor(p):
        if is_dtensor(t):
            return t if t.dtype == dtype else t.to(dtype)
        from torch.distributed.tensor import distribute_tensor

        full = t.detach().to(device=p.device, dtype=dtype)
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    if t.device != p.device or t.dtype != dtype:
        return t.to(device=p.device, dtype=dtype)
    return t


def gathered(t: Tensor) -> Tensor:
    """The full tensor on the CPU, for a checkpoint (a collective for a shard: every rank calls it)."""
    full = t.full_tensor() if is_dtensor(t) else t
    return full.detach().to("cpu", copy=True)


def global_sum(partial: Tensor, sharded: bool) -> Tensor:
    """``partial`` (this rank's share of a sum over shards) as the global sum: the value is all-reduced,
    the gradient stays this rank's own (each rank differentiates its shard's terms only, which is the
    global sum's gradient with respect to that shard)."""
    if not sharded or not (dist.is_available() and dist.is_initialized()):
        return partial
    total = partial.detach().clone()
    dist.all_reduce(total)
    return total + (partial - partial.detach())  # the value is exactly ``total``


def is_sharded(module: object) -> bool:
    """Whether ``fully_shard`` has been applied to ``module`` (an FSDP module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: object) -> None:
    """Register an FSDP module's parameters as their shards again (a no-op for any other module).

    FSDP keeps its root unit's parameters gathered after a forward (its backward would gather them again
    at once), so between a forward and the backward ``named_parameters()`` gives full tensors where every
    algorithm's state is sharded; an algorithm that edits shards in place (MIR's virtual step, LwF's
    teacher) reshards so the next forward gathers the edited values. Costs one more gather of the root's
    parameters in the backward: small for tiny_vla and GR00T (their blocks are units), a large part of
    SmolVLA and pi0 (their attention projections and embeddings stay in the root; see
    ``cl_vla.training.fsdp.PIECEWISE_LAYERS``), a cost still to be measured on GPUs."""
    if is_sharded(module):
        module.reshard()  # type: ignore[attr-defined]


def any_sharded(tensors: list[Tensor] | tuple[Tensor, ...]) -> bool:
    """Whether any of ``tensors`` is a shard."""
    return any(is_dtensor(t) for t in tensors)


__all__ = ["any_sharded", "gathered", "global_sum", "is_dtensor", "is_sharded", "like", "local", "reshard"]
