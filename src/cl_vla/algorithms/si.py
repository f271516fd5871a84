"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017): importance from the path integral of training.

Every optimizer step ``s`` of task ``t`` adds each parameter's share of the loss decrease,

    omega_i += -g_i(s) * delta_i(s)          (g: the task loss's gradient, delta: the applied update)

and at the task's end the importance is consolidated and the parameters are anchored:

    Omega_i <- max(0, Omega_i + omega_i / (Delta_i^2 + xi)),   Delta = theta(end of t) - theta(start of t)
    penalty = c * sum_i Omega_i (theta_i - theta*_i)^2
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.quadratic_penalty import quadratic_penalty
from cl_vla.algorithms.sharded import gathered, is_dtensor, like, local
from cl_vla.algorithms.state_placement import StatePlacement

_STATE_VERSION = 1


def _finite(value: Any, low: float, low_inclusive: bool) -> bool:
    if isinstance(value, bool):
        return False
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and (v >= low if low_inclusive else v > low)


def _trainable(module: Any) -> dict[str, Tensor]:
    return {n: p for n, p in module.policy.named_parameters() if p.requires_grad}


def _loss_scale(module: Any) -> float:
    """The AMP GradScaler's current scale (1 without one): under ``16-mixed`` the gradients seen in
    ``after_backward`` are still scaled, Lightning unscales them only just before clipping."""
    try:
        scaler = module.trainer.precision_plugin.scaler
    except (AttributeError, RuntimeError):  # no trainer attached (tests, plain modules)
        return 1.0
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    return float(scaler.get_scale())


class SI(CLAlgorithm):
    """Synaptic Intelligence over the policy's trainable parameters (``module.policy.named_parameters()``).

    - **Which gradient.** :meth:`after_backward` reads ``p.grad`` right after ``backward``: that is
      *before* gradient clipping (Lightning clips later, just before the optimizer step) and that is
      what the path integral needs: ``-g . delta`` estimates the loss change of the step, with ``g``
      the loss's true gradient and ``delta`` the update actually applied (clipping, Adam's scaling and
      weight decay shape ``delta``, which :meth:`observe` measures after the step). ``p.grad`` there is
      the gradient of the *total* loss, so SI's own penalty gradient ``2c Omega (theta - theta*)`` is
      subtracted (it is known exactly): ``omega`` accumulates the task loss's path integral only, as in
      the paper. Under fp16 AMP the GradScaler's scale is divided out; under DDP the gradients are
      already averaged over ranks, so every rank accumulates the same ``omega``.
    - **Start of a task** is read at its first step (the parameters before that step's update), not in
      ``on_task_start``: on a task-boundary resume the weights are restored only when training starts.
    - **Omega is clamped at zero** when consolidating, as in the authors' code (ganguli-lab/pathint:
      ``relu`` of the running sum): with noisy gradients a parameter's ``omega`` can come out negative,
      and a negative ``Omega`` would make the penalty unbounded below (rewarding drift from the anchor).
    - **Exact resume.** :meth:`state_dict` holds ``omega``, ``Omega``, the anchor and the task's start.
      The per-step buffers between ``after_backward`` and ``observe`` are not saved: the loop
      checkpoints only after ``observe``.

    Args:
        si_c: Penalty strength ``c`` (>= 0).
        xi: Damping ``xi`` (> 0) in ``omega / (Delta^2 + xi)``, for parameters that barely moved.
        state_dtype: ``"float32"``, ``"bfloat16"`` or None (each parameter's dtype): the precision
            Omega, the anchor and the task's
            start are kept in (the running ``omega`` stays float32: it is added to every step).
        state_device: ``"params"`` (with each parameter; sharded like it under FSDP) or ``"cpu"``
            (pinned host memory, copied to the device where a step reads them).
    """

    name = "si"

    def __init__(
        self,
        si_c: float = 0.1,
        xi: float = 1e-3,
        state_dtype: str | None = None,
        state_device: str = "params",
    ) -> None:
        self._check_hparams(si_c, xi)
        # Omega, the anchor and the task's start; the running omega is added to every step and stays
        # with the parameters in float32.
        self.placement = StatePlacement.parse(state_dtype, state_device)
        self.si_c = float(si_c)
        self.xi = float(xi)
        self._omega: dict[str, Tensor] = {}  # running path integral of the current task
        self._big_omega: dict[str, Tensor] = {}  # consolidated importance of finished tasks
        self._anchor: dict[str, Tensor] = {}  # theta* at the end of the last finished task
        self._start: dict[str, Tensor] = {}  # theta at the start of the current task
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (gradient, theta before the step)
        self._buffers: dict[str, tuple[Tensor, Tensor]] = {}  # the storage of _pending, reused each step
        self._weighted: tuple[list[str], list[Tensor]] | None = None  # from this step's penalty forward
        self._module: Any = None
        self._amp = False  # the pending step ran under an fp16 loss scale (overflow steps possible)
        self.tasks_consolidated: list[int] = []

    @staticmethod
    def _check_hparams(si_c: Any, xi: Any) -> None:
        if not _finite(si_c, 0.0, low_inclusive=True):
            raise ValueError(f"si_c must be a finite number >= 0, got {si_c!r}.")
        if not _finite(xi, 0.0, low_inclusive=False):
            raise ValueError(f"xi must be a finite number > 0, got {xi!r}.")

    # ---- per step -------------------------------------------------------------------------------

    def setup(self, module: Any) -> None:
        """Remember the module, for :meth:`on_task_end` without a context."""
        self._module = module

    def after_backward(self, module: Any, batch: Mapping[str, Any]) -> None:
        """Record each parameter's task-loss gradient and its value before the optimizer step."""
        self._module = module
        params = _trainable(module)
        if not self._start:
            self._start = {n: self.placement.store(p.detach().clone(), p) for n, p in params.items()}
        names = [n for n, p in params.items() if p.grad is not None]  # unused: the optimizer skips it
        kept, self._weighted = self._weighted, None  # valid for this step only
        if not names:
            self._pending = {}
            return
        # Under FSDP each rank works on its own shards (local views of the DTensors; omega stays sharded).
        grads = [local(params[n].grad).detach() for n in names]
        ps = [local(params[n]).detach() for n in names]
        wide = torch.promote_types(grads[0].dtype, torch.float32)
        scale = _loss_scale(module)
        if all(g.dtype == wide and p.dtype == wide for g, p in zip(grads, ps, strict=True)):
            # Into buffers kept across steps, with fused kernels: no per-step allocation of two copies
            # of the model (a loss scale is a power of two: dividing by it is exact).
            g_list, before = self._step_buffers(names, ps)
            torch._foreach_copy_(g_list, grads)
            if scale != 1.0:
                torch._foreach_div_(g_list, scale)
        else:
            g_list = [g.to(wide, copy=True).div_(scale) for g in grads]
            before = [p.to(wide, copy=True) for p in ps]
        penalized = [i for i, n in enumerate(names) if n in self._big_omega]
        if penalized and self.si_c != 0.0:
            # p.grad holds the total loss's gradient; SI's own penalty gradient 2c Omega (theta - theta*)
            # is known exactly, so the task loss's gradient is recovered by subtracting it. The penalty's
            # forward already computed Omega (theta - theta*) with the same kernels (so the same bits);
            # without it (no fused penalty this step) it is computed here.
            if kept is not None and kept[0] == [names[i] for i in penalized]:
                shift = kept[1]
            else:
                omegas = [local(self._use(self._big_omega, names[i], params[names[i]])) for i in penalized]
                anchors = [local(self._use(self._anchor, names[i], params[names[i]])) for i in penalized]
                shift = torch._foreach_sub([ps[i] for i in penalized], anchors)
                torch._foreach_mul_(shift, omegas)
            torch._foreach_add_([g_list[i] for i in penalized], shift, alpha=-2.0 * self.si_c)
        torch._foreach_copy_(before, ps)
        self._pending = {n: (g, b) for n, g, b in zip(names, g_list, before, strict=True)}
        self._amp = scale != 1.0

    def _step_buffers(self, names: list[str], ps: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per-parameter (gradient, theta before the step) buffers, made once and reused every step."""
        out_g, out_b = [], []
        for n, p in zip(names, ps, strict=True):
            buf = self._buffers.get(n)
            if buf is None or buf[0].shape != p.shape or buf[0].dtype != p.dtype or buf[0].device != p.device:
                buf = self._buffers[n] = (torch.empty_like(p), torch.empty_like(p))
            out_g.append(buf[0])
            out_b.append(buf[1])
        return out_g, out_b

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """After the optimizer step: ``omega += -g * (theta_after - theta_before)``."""
        module = kwargs.get("module")
        module = self._module if module is None else module
        if module is None or not self._pending:
            return
        params = dict(module.policy.named_parameters())
        names = [n for n in self._pending if n in params]
        g = [self._pending[n][0] for n in names]
        after = [local(params[n]).detach().to(t.dtype) for n, t in zip(names, g, strict=True)]
        # In place, in the buffer that held theta before the step: (before - after) * g is exactly
        # -(g * delta) (negation is exact), so omega += it equals omega -= g * delta bit for bit.
        minus_delta = [self._pending[n][1] for n in names]
        torch._foreach_sub_(minus_delta, after)
        torch._foreach_mul_(minus_delta, g)
        if getattr(self, "_amp", False):
            # A step skipped on an AMP overflow has delta 0 and an inf gradient: count it as 0, not NaN.
            for t in minus_delta:
                t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        for n, t in zip(names, minus_delta, strict=True):
            if n not in self._omega:
                self._omega[n] = torch.zeros_like(params[n].detach(), dtype=t.dtype)
        omega = [local(self._to(self._omega, n, params[n])) for n in names]
        torch._foreach_add_(omega, minus_delta)  # omega += -g * delta
        self._pending = {}

    @staticmethod
    def _to(store: dict[str, Tensor], name: str, param: Tensor) -> Tensor:
        """``store[name]`` on ``param``'s device and sharded like it (placed once and kept: a restored
        state arrives whole, on the CPU); its dtype is kept."""
        t = store[name]
        if is_dtensor(param) != is_dtensor(t) or t.device != param.device:
            store[name] = t = like(t, param, dtype=t.dtype)
        return t

    def _use(self, store: dict[str, Tensor], name: str, param: Tensor) -> Tensor:
        """``store[name]`` (Omega, anchor or start) kept as configured, returned ready for arithmetic
        with ``param`` (its dtype and device); a restored state is placed once and kept so."""
        t = store[name]
        placed = self.placement.store(t, param)
        if placed is not t:
            store[name] = placed
        return self.placement.use(placed, param)

    # ---- the penalty ----------------------------------------------------------------------------

    def penalty(self, module: Any, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> Tensor | None:
        """``c * sum_i Omega_i (theta_i - theta*_i)^2``; None before the first task ends."""
        if not self._big_omega or self.si_c == 0.0:
            return None
        names, ps, omegas, anchors = [], [], [], []
        for n, p in module.policy.named_parameters():
            if n in self._big_omega:
                names.append(n)
                ps.append(p)
                omegas.append(self._use(self._big_omega, n, p))
                anchors.append(self._use(self._anchor, n, p))
        if not ps:
            return None
        keep: list[Tensor] = []
        loss = quadratic_penalty(self.si_c, ps, omegas, anchors, keep=keep)
        # Omega (theta - theta*), for after_backward (only where it has the gradients' dtype).
        wide = all(p.dtype == torch.promote_types(p.dtype, torch.float32) for p in ps)
        self._weighted = (names, keep) if keep and wide and torch.is_grad_enabled() else None
        return loss

    # ---- task boundary --------------------------------------------------------------------------

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """``Omega <- max(0, Omega + omega / (Delta^2 + xi))``; anchor at the current parameters; reset."""
        module = context.module if context is not None and context.module is not None else self._module
        if module is None:
            raise ValueError(
                "SI.on_task_end needs the module: pass a TaskContext with module or call setup()."
            )
        for n, p in _trainable(module).items():
            theta = p.detach().to(torch.promote_types(p.dtype, torch.float32))
            start = self._use(self._start, n, p).to(theta.dtype) if n in self._start else theta
            omega = self._to(self._omega, n, p) if n in self._omega else torch.zeros_like(theta)
            new = omega / ((theta - start).square() + self.xi)
            if n in self._big_omega:
                new = new + self._use(self._big_omega, n, p).to(new.dtype)
            self._big_omega[n] = self.placement.store(new.clamp_(min=0.0), p)
            self._anchor[n] = self.placement.store(p.detach().clone(), p)
        self._omega, self._start, self._pending = {}, {}, {}
        self.tasks_consolidated.append(int(task_id))

    # ---- the seed's interface -------------------------------------------------------------------

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """Per-parameter importance ``Omega`` (copies; ``{}`` before any task ended). ``batch_size`` is
        ignored (the seed's signature)."""
        return {n: o.detach().clone() for n, o in self._big_omega.items()}

    def path_integral(self) -> dict[str, Tensor]:
        """The current task's running ``omega`` (copies)."""
        return {n: o.detach().clone() for n, o in self._omega.items()}

    def anchor(self) -> dict[str, Tensor]:
        """``theta*``: the parameters at the end of the last finished task (copies)."""
        return {n: a.detach().clone() for n, a in self._anchor.items()}

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, ``omega``, ``Omega``, anchor and task start (CPU tensor copies)."""

        def cpu(d: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {n: gathered(t) for n, t in d.items()}  # whole tensors, also from FSDP shards

        return {
            "name": self.name,
            "version": _STATE_VERSION,
            "si_c": self.si_c,
            "xi": self.xi,
            "state_dtype": self.placement.names[0],
            "state_device": self.placement.names[1],
            "omega": cpu(self._omega),
            "big_omega": cpu(self._big_omega),
            "anchor": cpu(self._anchor),
            "start": cpu(self._start),
            "tasks_consolidated": list(self.tasks_consolidated),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot exactly (hyperparameters included)."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state is for algorithm {state.get('name')!r}, not {self.name!r}.")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"unsupported SI state version {state.get('version')!r}; expected 1.")
        self._check_hparams(state["si_c"], state["xi"])
        if state["big_omega"].keys() != state["anchor"].keys():
            raise ValueError("SI state has importance and anchor entries for different parameters.")
        self.si_c, self.xi = float(state["si_c"]), float(state["xi"])

        def copy(d: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {str(n): t.clone() for n, t in d.items()}

        self._omega, self._big_omega = copy(state["omega"]), copy(state["big_omega"])
        self._anchor, self._start = copy(state["anchor"]), copy(state["start"])
        self.tasks_consolidated = [int(t) for t in state.get("tasks_consolidated", [])]
        self._pending = {}

    def __repr__(self) -> str:
        return f"SI(si_c={self.si_c}, xi={self.xi}, tasks_consolidated={self.tasks_consolidated})"


__all__ = ["SI"]
