"""Learning without Forgetting (LwF; Li & Hoiem, 2017): distill the previous model's outputs.

At every task end a frozen copy of the policy (the *teacher*) is taken; while training the next task,
the student is pulled towards the teacher's outputs on the *current* batch, so no old data is needed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.sharded import any_sharded
from cl_vla.algorithms.sharded_teacher import ShardedTeacher

ACTION_PRED = "action_pred"
ACTION_IS_PAD = "action_is_pad"
DISTILL_LOSSES = ("l2", "l1")

_STATE_VERSION = 1


def check_state_name(state: Mapping[str, Any], name: str) -> None:
    # Loading another algorithm's state would silently drop it; a mismatch is a config error.
    if state.get("name", name) != name:
        raise ValueError(f"state is for algorithm {state.get('name')!r}, not {name!r}.")


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` as a float, or a one-sentence ValueError unless it is finite and >= 0."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if isinstance(value, bool) or not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return out


def action_chunk(policy: Any, batch: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> Tensor:
    """The policy's differentiable "logits": its predicted normalized action chunk ``(B, chunk, A)``.

    Taken from ``outputs["action_pred"]`` when the training step already computed it (no second
    forward), otherwise from ``policy.compute_outputs(batch)["action_pred"]``. ``predict_action_chunk``
    is no substitute: lerobot decorates it with ``no_grad``, switches to eval mode, and for diffusion-style
    policies it samples noise, so there is nothing stable to distill.
    """
    pred = outputs.get(ACTION_PRED) if outputs is not None else None
    if isinstance(pred, Tensor):
        return pred
    compute = getattr(policy, "compute_outputs", None)
    out = compute(dict(batch)) if callable(compute) else None
    pred = out.get(ACTION_PRED) if isinstance(out, Mapping) else None
    if not isinstance(pred, Tensor):
        raise TypeError(
            f"policy {type(policy).__name__} has no compute_outputs(batch) returning 'action_pred' (its "
            "differentiable normalized action chunk), which output distillation needs."
        )
    return pred


def masked_distance(
    student: Tensor, teacher: Tensor, action_is_pad: Tensor | None, kind: str = "l2"
) -> Tensor:
    """Per-sample squared (``l2``) or absolute (``l1``) error averaged over valid steps and action dims.

    Padded steps (past an episode's end) are masked like in the policy's own loss. Shape ``(B,)``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student outputs {tuple(student.shape)} and targets {tuple(teacher.shape)} differ.")
    diff = student - teacher.to(student.dtype)
    err = diff.square() if kind == "l2" else diff.abs()
    if err.dim() == 2:  # single-step policies: (B, A)
        err = err.unsqueeze(1)
    if action_is_pad is None or action_is_pad.shape != err.shape[:2]:
        valid = torch.ones(err.shape[:2], dtype=err.dtype, device=err.device)
    else:
        valid = (~action_is_pad.bool()).to(err.dtype)
    err = err * valid.unsqueeze(-1)
    return err.sum(dim=(1, 2)) / (valid.sum(1) * err.shape[-1]).clamp_min(1)


class LwF(CLAlgorithm):
    """Learning without Forgetting for action-regression policies.

    In the paper the teacher's *logits* (temperature-softened class probabilities) are distilled with a
    KL term. A VLA policy regresses actions, so here the "logits" are the predicted normalized action
    chunk, ``policy.compute_outputs(batch)["action_pred"]`` of shape ``(B, chunk, A)``, and the
    distillation loss is their L2 (``distill="l2"``, the regression analogue of KL between Gaussians of
    fixed variance) or L1 distance, averaged over the steps ``action_is_pad`` marks valid::

        loss = policy_loss(batch) + alpha * mean_b distill(student(batch)_b, teacher(batch)_b)

    Under FSDP the teacher is held as shards of the student's parameters
    (:class:`~cl_vla.algorithms.sharded_teacher.ShardedTeacher`), 1/N on each rank.

    The teacher is the policy as it was at the end of the previous task (deep-copied, eval mode, no
    gradients); task 0 trains without the term. Policies without ``compute_outputs`` get a one-sentence
    ``TypeError`` at the first penalised step.

    The teacher's weights are part of :meth:`state_dict` (a dict of tensors), so a resumed run distils
    towards exactly the same teacher; the module itself is rebuilt from them in :meth:`setup` (or lazily
    at the first :meth:`penalty`). :meth:`sample` returns the teacher outputs last computed (the seed's
    "teacher logits on the current batch"); :meth:`teacher_outputs` computes them for a batch.

    Args:
        alpha: Weight of the distillation term (the paper's lambda_o), >= 0.
        distill: ``"l2"`` (squared error) or ``"l1"`` (absolute error).
    """

    name = "lwf"

    def __init__(self, alpha: float = 1.0, distill: str = "l2") -> None:
        self.alpha = check_nonnegative("alpha", alpha)
        if distill not in DISTILL_LOSSES:
            raise ValueError(f"distill must be 'l2' or 'l1', got {distill!r}.")
        self.distill = distill
        self._teacher: torch.nn.Module | None = None
        self._sharded: ShardedTeacher | None = None  # under FSDP: the teacher as shards of the student
        # Teacher weights restored from a checkpoint before the policy exists to copy the architecture.
        self._pending_teacher: dict[str, Tensor] | None = None
        self._policy: torch.nn.Module | None = None
        self._last_teacher: dict[str, Tensor] = {}

    # ---- teacher --------------------------------------------------------------------------------

    @property
    def has_teacher(self) -> bool:
        return self._teacher is not None or self._pending_teacher is not None or self._sharded is not None

    @staticmethod
    def _freeze(policy: torch.nn.Module) -> torch.nn.Module:
        teacher = copy.deepcopy(policy)
        for p in teacher.parameters():
            p.requires_grad_(False)
            p.grad = None  # a deep copy would carry the student's last gradients along
        return teacher.eval()

    def snapshot(self, policy: torch.nn.Module) -> None:
        """Make a frozen copy of ``policy`` the teacher (replacing any previous one)."""
        self._policy = policy
        self._pending_teacher = None
        if any_sharded(list(policy.parameters())):
            self._teacher, self._sharded = None, ShardedTeacher.snapshot(policy)
        else:
            self._teacher, self._sharded = self._freeze(policy), None

    def _build_pending(self, policy: torch.nn.Module | None) -> None:
        if self._pending_teacher is None:
            return
        if policy is None:
            raise RuntimeError(
                "LwF holds restored teacher weights but no policy to rebuild it from; call setup()."
            )
        teacher = self._freeze(policy)
        teacher.load_state_dict(self._pending_teacher, strict=True)
        self._teacher, self._pending_teacher = teacher, None

    def _ready_teacher(self, device: torch.device) -> torch.nn.Module | None:
        self._build_pending(self._policy)
        if self._teacher is None:
            return None
        # The trainer may move the student to an accelerator after the teacher was built.
        param = next(self._teacher.parameters(), None)
        if param is not None and param.device != device:
            self._teacher.to(device)
        self._teacher.eval()
        return self._teacher

    def teacher_outputs(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The teacher's action chunk on a preprocessed ``batch`` (empty dict before the first task end)."""
        policy = self._policy
        if policy is not None and any_sharded(list(policy.parameters())):
            if self._sharded is None and (self._teacher is not None or self._pending_teacher is not None):
                # Built (or restored) before FSDP sharded the student: kept from now on as shards.
                self._build_pending(policy)
                assert self._teacher is not None
                self._sharded = ShardedTeacher.from_full(policy, self._teacher.state_dict())
                self._teacher = None
            if self._sharded is not None:
                with self._sharded.swapped_in(policy), torch.no_grad():
                    pred = action_chunk(policy, batch).detach().clone()
                self._last_teacher = {ACTION_PRED: pred}
                return self._last_teacher
        with torch.inference_mode():
            return self._unsharded_teacher_outputs(batch)

    def _unsharded_teacher_outputs(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        device = _batch_device(batch, self._policy)
        teacher = self._ready_teacher(device)
        if teacher is None:
            self._last_teacher = {}
        else:
            self._last_teacher = {ACTION_PRED: action_chunk(teacher, batch).detach()}
        return self._last_teacher

    # ---- hooks ----------------------------------------------------------------------------------

    def setup(self, module: Any) -> None:
        """Remember the policy and rebuild a teacher restored by :meth:`load_state_dict`."""
        self._policy = getattr(module, "policy", module)
        self._build_pending(self._policy)

    def penalty(
        self, module: Any, batch: Mapping[str, Any], outputs: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """``alpha`` times the masked distillation distance to the teacher (None before a teacher exists)."""
        policy = getattr(module, "policy", module)
        if self._policy is None:
            self._policy = policy
        if not self.has_teacher or self.alpha == 0:
            return None
        target = self.teacher_outputs(batch)[ACTION_PRED]
        student = action_chunk(policy, batch, outputs)
        dist = masked_distance(student, target, batch.get(ACTION_IS_PAD), self.distill)
        return self.alpha * dist.mean()

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """No-op: LwF needs nothing per step beyond its penalty."""

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """The teacher outputs last computed on a current batch (``{"action_pred": ...}``), else empty."""
        return dict(self._last_teacher)

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """Snapshot the policy as the teacher for the tasks that follow."""
        module = context.module if context is not None else None
        policy = getattr(module, "policy", module)
        if policy is None:
            policy = self._policy
        if policy is None:
            raise RuntimeError("LwF.on_task_end needs context.module (or a prior setup(module)) to copy.")
        self.snapshot(policy)

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and the teacher's weights (CPU tensors; ``None`` before the first task end)."""
        if self._sharded is not None and self._policy is not None:
            teacher = self._sharded.state_dict(self._policy)  # gathered: every rank calls state_dict
        elif self._teacher is not None:
            teacher = {k: v.detach().to("cpu", copy=True) for k, v in self._teacher.state_dict().items()}
        elif self._pending_teacher is not None:
            teacher = {k: v.clone() for k, v in self._pending_teacher.items()}
        else:
            teacher = None
        return {
            "name": self.name,
            "version": _STATE_VERSION,
            "alpha": self.alpha,
            "distill": self.distill,
            "teacher": teacher,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore hyperparameters and teacher weights; the teacher module is rebuilt from the policy."""
        check_state_name(state, self.name)
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"unsupported LwF state version {state.get('version')!r}; expected 1.")
        alpha = check_nonnegative("alpha", state["alpha"])
        if state["distill"] not in DISTILL_LOSSES:
            raise ValueError(f"distill must be 'l2' or 'l1', got {state['distill']!r}.")
        teacher = state.get("teacher")
        if teacher is not None and not all(isinstance(v, Tensor) for v in teacher.values()):
            raise ValueError("LwF state's teacher must map parameter names to tensors.")
        self.alpha, self.distill = alpha, state["distill"]
        self._teacher, self._sharded, self._last_teacher = None, None, {}
        self._pending_teacher = None if teacher is None else {k: v.clone() for k, v in teacher.items()}
        if self._policy is not None:
            self._build_pending(self._policy)

    def __repr__(self) -> str:
        return f"LwF(alpha={self.alpha}, distill={self.distill!r}, teacher={self.has_teacher})"


def _batch_device(batch: Mapping[str, Any], policy: torch.nn.Module | None) -> torch.device:
    # The student's device decides (the teacher must sit beside it); the batch's, without a student.
    param = next(policy.parameters(), None) if policy is not None else None
    if param is not None:
        return param.device
    for v in batch.values():
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")


__all__ = ["LwF", "action_chunk", "masked_distance"]
