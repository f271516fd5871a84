"""LIBERO's within-task protocol (``eval.keep_best_within_task``): keep the best weights seen during a task.

LIBERO's ``learn_one_task`` (``libero/lifelong/algos/base.py``, 148-254) evaluates the current task
before its training (epoch 0) and every ``eval_every`` epochs, saves the policy whenever its success
beats every earlier evaluation (strictly: the first of equal bests is kept), and at the task's end
reloads that policy before ``end_task`` and before the evaluation of every task. Only the policy's
weights go back; the algorithm's state and the optimizer stay as the last step left them, as in LIBERO.

The copy lives in host memory (a sharded DTensor stays where its shard is: gathering it would cost a
collective and a whole copy per rank) and goes into every mid-task checkpoint, so a resumed run
restores the same weights at the task's end as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class BestWithinTask:
    """The weights at the best within-task evaluation of the current task.

    Only what training can change is copied: the parameters that require a gradient and the buffers
    (a frozen VLM backbone is never copied).
    """

    def __init__(self, higher_is_better: bool) -> None:
        self.higher_is_better = higher_is_better
        self.weights: dict[str, torch.Tensor] | None = None
        self.best: float | None = None  # the score at which ``weights`` were taken

    def is_better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (LIBERO's strict ``prev_success_rate < success_rate``)."""
        if self.best is None:
            return True
        return value > self.best if self.higher_is_better else value < self.best

    def offer(self, module: nn.Module, value: float) -> bool:
        """Record an evaluation of the current weights; copy them when it is the best so far."""
        if not self.is_better(value):
            return False
        self.best = float(value)
        keep = {name for name, p in module.named_parameters() if p.requires_grad}
        keep |= {name for name, _ in module.named_buffers()}
        self.weights = {
            name: (t.detach().clone() if _is_dtensor(t) else t.detach().to("cpu", copy=True))
            for name, t in module.state_dict(keep_vars=True).items()
            if name in keep
        }
        return True

    def restore(self, module: nn.Module) -> None:
        """Put the best weights back into ``module`` (in place, so optimizers and hooks keep them)."""
        if self.weights is None:
            raise RuntimeError("No within-task weights were kept for this task; nothing to restore.")
        with torch.no_grad():
            current = module.state_dict(keep_vars=True)
            for name, saved in self.weights.items():
                current[name].data.copy_(saved)

    def clear(self) -> None:
        self.weights, self.best = None, None

    def state_dict(self) -> dict:
        """Tensors and a float, for the checkpoint (loaded with ``weights_only=True``)."""
        if self.weights is None:
            return {}
        return {"best": self.best, "weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.clear()
            return
        self.best = float(state["best"])
        self.weights = dict(state["weights"])
