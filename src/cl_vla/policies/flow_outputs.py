"""Distillable outputs of lerobot's flow-matching VLAs (SmolVLA, pi0, pi0.5) for LwF and DER++.

Those algorithms distill ``compute_outputs(batch)["action_pred"]``, a differentiable, deterministic
function of the observation. A flow-matching policy's training forward draws random noise and a
random time, and ``predict_action_chunk`` runs without gradients. The output used here is the
one-step flow sample from a fixed noise: at time 1 the model sees ``x_1 = noise`` only (the actions do
not enter), predicts the velocity ``v``, and ``noise - v`` is the action chunk one Euler step
gives. Fixed noise (seeded, the same for every batch) makes teacher and student, and DER++'s stored
outputs, comparable. The velocity is read off the model's ``action_out_proj`` with a forward hook, so
lerobot's own forward computes it.
"""

from __future__ import annotations

import types
from typing import Any

import torch

FLOW_TYPES = ("smolvla", "pi0", "pi05")
_NOISE_SEED = 0


def _fixed_noise(shape: tuple[int, ...], device: Any) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(_NOISE_SEED)
    return torch.randn(shape, generator=g).to(device)


def compute_flow_outputs(policy: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"action_pred": (B, chunk, action_dim)}``: the one-step flow sample from fixed noise."""
    model = policy.model
    captured: list[torch.Tensor] = []
    hook = model.action_out_proj.register_forward_hook(lambda _m, _i, out: captured.append(out))
    noise_box: list[torch.Tensor] = []

    def sample_noise(shape: Any, device: Any) -> torch.Tensor:
        noise_box.append(_fixed_noise(tuple(shape), device))
        return noise_box[-1]

    def sample_time(bsize: int, device: Any) -> torch.Tensor:
        return torch.ones(bsize, device=device)

    model.sample_noise, model.sample_time = sample_noise, sample_time  # instance attrs shadow methods
    try:
        batch = dict(batch)
        if "action" in batch:  # at time 1 the actions do not enter the model's input
            batch["action"] = torch.zeros_like(batch["action"])
        else:  # evaluation batches without targets: any chunk of the right shape
            ref = next(v for v in batch.values() if isinstance(v, torch.Tensor))
            batch["action"] = torch.zeros(
                len(ref), policy.config.chunk_size, policy.config.action_feature.shape[0], device=ref.device
            )
        policy.forward(batch)
    finally:
        del model.sample_noise, model.sample_time
        hook.remove()
    velocity = captured[-1][:, -policy.config.chunk_size :].float()
    pred = noise_box[-1].float() - velocity
    return {"action_pred": pred[:, :, : policy.config.action_feature.shape[0]]}


def flow_action_loss(
    policy: Any,
    pred: torch.Tensor,
    target: torch.Tensor,
    action_is_pad: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Squared error of ``action_pred`` against the target chunk, padded steps masked (DER++'s
    per-sample replay loss; the policy's own flow-matching loss draws noise and cannot be reused)."""
    err = (pred - target.to(pred.dtype)).square()
    valid = torch.ones(err.shape[:2], dtype=err.dtype, device=err.device)
    if action_is_pad is not None:
        valid = (~action_is_pad.bool()).to(err.dtype)
    err = err * valid.unsqueeze(-1)
    per_sample = err.sum(dim=(1, 2)) / (valid.sum(1) * err.shape[-1]).clamp_min(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")


def add_compute_outputs(policy: Any) -> None:
    """Give a flow-matching lerobot policy ``compute_outputs`` and ``action_loss`` (instance attributes:
    no new state, nothing lerobot saves)."""
    if policy.config.type not in FLOW_TYPES:
        return
    if getattr(policy, "compute_outputs", None) is None:
        policy.compute_outputs = types.MethodType(compute_flow_outputs, policy)
    if getattr(policy, "action_loss", None) is None:
        policy.action_loss = types.MethodType(flow_action_loss, policy)
