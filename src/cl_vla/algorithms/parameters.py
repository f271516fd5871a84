"""Which of the policy's parameters an algorithm works on.

One definition for every algorithm: the parameters that currently train (PackNet and LoRA freeze
some), by name, in ``named_parameters()`` order, which is also the order of the list the optimizer
gets (``CLPolicyModule`` hands it the parameters that require grad).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def policy_of(module: Any) -> nn.Module:
    """``module.policy`` for the LightningModule, ``module`` itself for a bare policy."""
    return getattr(module, "policy", module)


def trainable_parameters(policy: nn.Module) -> dict[str, nn.Parameter]:
    """``policy.named_parameters()`` that currently train (PackNet / LoRA may freeze some)."""
    return {n: p for n, p in policy.named_parameters() if p.requires_grad}


__all__ = ["policy_of", "trainable_parameters"]
