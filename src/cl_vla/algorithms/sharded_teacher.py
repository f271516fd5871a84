"""A frozen copy of an FSDP-sharded policy, held as shards exactly like the policy's own parameters.

LwF's teacher is the whole policy as it was at the last task end. Under FSDP a deep copy is not allowed
(and would be a full copy on every rank); instead each rank keeps its 1/N of the teacher's parameters
(DTensors placed like the student's) and the teacher's outputs are computed by the student module with
the teacher's shards swapped in: FSDP gathers them as in any forward, and the student's shards are put
back afterwards. The swap holds one more 1/N copy (the student's shards) for the duration of a forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cl_vla.algorithms.sharded import gathered, like, local, reshard


class ShardedTeacher:
    """The teacher's parameters as shards of ``policy``'s and its buffers (replicated, as FSDP keeps them)."""

    def __init__(self, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        self.params, self.buffers = params, buffers

    @classmethod
    def snapshot(cls, policy: nn.Module) -> ShardedTeacher:
        """The policy as it is now (each rank copies its own shards)."""
        params = {n: p.detach().clone() for n, p in policy.named_parameters()}
        return cls(params, {n: b.detach().clone() for n, b in policy.named_buffers()})

    @classmethod
    def from_full(cls, policy: nn.Module, state: Mapping[str, Tensor]) -> ShardedTeacher:
        """A teacher from whole tensors (a checkpoint, or a teacher built before the policy was sharded):
        each rank keeps its part of every parameter; a buffer the state lacks is the policy's own."""
        params = {n: like(state[n], p) for n, p in policy.named_parameters()}
        buffers = {
            n: state[n].to(b.device) if n in state else b.detach().clone() for n, b in policy.named_buffers()
        }
        return cls(params, buffers)

    def state_dict(self, policy: nn.Module) -> dict[str, Tensor]:
        """Whole CPU tensors keyed like ``policy.state_dict()`` (a collective: every rank calls it)."""
        keys = policy.state_dict().keys()
        everything = {**self.params, **self.buffers}
        return {k: gathered(everything[k]) for k in keys if k in everything}

    @contextmanager
    def swapped_in(self, policy: nn.Module) -> Iterator[None]:
        """Inside, ``policy`` holds the teacher's weights and is in eval mode; outside, its own again."""
        was_training = policy.training
        reshard(policy)  # a forward gathers the swapped shards, not what the root kept gathered
        tensors = {**dict(policy.named_parameters()), **dict(policy.named_buffers())}
        teacher = {**self.params, **self.buffers}
        own = {n: local(t).detach().clone() for n, t in tensors.items() if n in teacher}
        try:
            with torch.no_grad():
                for n in own:
                    local(tensors[n]).copy_(local(teacher[n]))
            policy.eval()
            yield
        finally:
            with torch.no_grad():
                for n, value in own.items():
                    local(tensors[n]).copy_(value)
            policy.train(was_training)
            reshard(policy)  # the student's backward gathers the student's shards again


__all__ = ["ShardedTeacher"]
