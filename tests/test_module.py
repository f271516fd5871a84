"""CLPolicyModule's optimizer across task boundaries."""

from __future__ import annotations

import pytest
import torch

from cl_vla.algorithms.sequential import Sequential
from cl_vla.errors import CLVLAError
from cl_vla.training.module import CLPolicyModule


def _module(reset: bool) -> CLPolicyModule:
    policy = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    return CLPolicyModule(
        policy,
        lambda b: b,
        None,
        Sequential(),
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=0,
        min_lr_ratio=0.1,
        steps_per_task=4,
        reset_optimizer_per_task=reset,
    )


def test_kept_optimizer_carries_its_moments_and_reset_builds_a_fresh_one() -> None:
    kept = _module(reset=False)
    first = kept.configure_optimizers()["optimizer"]
    assert kept.configure_optimizers()["optimizer"] is first
    fresh = _module(reset=True)
    first = fresh.configure_optimizers()["optimizer"]
    assert fresh.configure_optimizers()["optimizer"] is not first


def test_kept_optimizer_refuses_a_changed_trainable_set_in_one_sentence() -> None:
    module = _module(reset=False)
    module.configure_optimizers()
    module.policy[0].requires_grad_(False)  # what a per-task adapter / freezing algorithm does
    module.task = 1
    with pytest.raises(CLVLAError, match="reset_optimizer_per_task=true") as err:
        module.configure_optimizers()
    assert len(str(err.value).splitlines()) == 1 and "task 1" in str(err.value)
    # Resetting per task builds the optimizer over whatever trains now.
    module.reset_optimizer_per_task = True
    opt = module.configure_optimizers()["optimizer"]
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in module.policy[1].parameters()}
