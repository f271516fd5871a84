"""Averaged GEM (A-GEM; Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019).

GEM's K constraints (one per past task) become one: a reference gradient ``g_ref`` on a random batch of
the episodic memory drawn across all past tasks. If the current gradient ``g`` conflicts with it
(``g . g_ref < 0``), ``g`` is projected onto the half-space ``{x : x . g_ref >= 0}``:

    g <- g - (g . g_ref / g_ref . g_ref) g_ref

One extra forward/backward of ``memory_batch_size`` frames per step, whatever the number of tasks.
The memory, its checkpointing, how frames are loaded and the DDP averaging of ``g_ref`` are GEM's
(:class:`cl_vla.algorithms.gem.EpisodicGradientAlgorithm`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from cl_vla.algorithms.gem import EpisodicGradientAlgorithm, shard_reduction
from cl_vla.algorithms.gradient_projection import flat_grad, write_flat_grad
from cl_vla.algorithms.parameters import policy_of, trainable_parameters


def agem_project(
    g: torch.Tensor, g_ref: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """``g`` if ``g . g_ref >= 0`` (or ``g_ref`` is zero), else ``g - (g . g_ref / g_ref . g_ref) g_ref``.

    ``reduce`` completes the two inner products when ``g`` and ``g_ref`` are this rank's FSDP shards
    (one all-reduce of two numbers); the projection itself is then local."""
    if g.shape != g_ref.shape or g.ndim != 1:
        raise ValueError(f"agem_project needs two vectors of one shape, got {g.shape} and {g_ref.shape}.")
    dot = torch.dot(g, g_ref)
    ref_sq = torch.dot(g_ref, g_ref)
    if reduce is not None:
        dot, ref_sq = reduce(torch.stack([dot, ref_sq]))
    if not bool(dot < 0) or not bool(ref_sq > 0):
        return g
    return g - (dot / ref_sq) * g_ref


class AGEM(EpisodicGradientAlgorithm):
    """A-GEM: one averaged memory gradient per step constrains the update.

    Args:
        memory_per_task: References kept per finished task (LIBERO's A-GEM: 1000 per task).
        memory_batch_size: Frames of the reference batch, drawn without replacement across all stored
            tasks (all of them when fewer are stored): A-GEM's authors use 256. Unlike GEM it may
            exceed ``memory_per_task``, since the batch spans every past task's memory.
        seed: Seeds the memory selection and the per-step reference batches.
    """

    name = "agem"
    _batch_within_task = False

    def __init__(self, memory_per_task: int = 1000, memory_batch_size: int = 256, seed: int = 0) -> None:
        # A-GEM has no margin: the projection is exactly onto the constraint's boundary.
        super().__init__(memory_per_task, memory_batch_size, 0.0, seed)

    def _step_draws(self, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        return [self._draw_across(rng, self.memory_batch_size)]

    def after_backward(self, module: Any, batch: Mapping[str, Any]) -> None:
        """Project the current gradient when it conflicts with the memory's reference gradient."""
        if not self._memory.task_ids():
            return
        params = list(trainable_parameters(policy_of(module)).values())
        (memory_batch,) = self._memory_batches()
        g_ref = self._average_over_ranks(self._memory_gradient(module, params, memory_batch), params)
        self.num_steps += 1  # only once the step's draw was used: a failed step is drawn again
        g = flat_grad(params).detach()
        projected = agem_project(g, g_ref, shard_reduction(params))
        changed = projected is not g
        if changed:
            write_flat_grad(params, projected)
            self.num_projections += 1
        self._log(module, "train/agem_projected", float(changed))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("margin")
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict({**state, "margin": 0.0})


__all__ = ["AGEM", "agem_project"]
