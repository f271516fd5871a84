"""Per-task LoRA adapters (TAIL: Liu et al. 2023, "TAIL: Task-specific adapters for imitation learning").

Every task ``t`` gets its own low-rank adapter ``"task_t"`` injected (through ``peft``) into the same
layers of the policy; while task ``t`` trains, that adapter is the only thing that trains (the base
model and earlier adapters are frozen), so earlier tasks cannot be forgotten: their adapters and the
base stay bit-identical. Evaluation of task ``j`` uses adapter ``"task_j"`` (task identity is given at
test time, as in TAIL); a task without an adapter yet (unseen, or task 0 with
``train_base_on_first_task``) is evaluated with adapters disabled, i.e. the base model alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.sequential import _check_state_name
from cl_vla.errors import ConfigError
from cl_vla.policies.lora import (
    LoRASettings,
    activate_adapter,
    active_adapter,
    adapter_names,
    adapter_state,
    inject_lora,
    load_adapter_state,
    set_trainable,
)

_ADAPTER_RE = re.compile(r"task_(\d+)")


class PerTaskLoRA(CLAlgorithm):
    """One LoRA adapter per task on a frozen base model; the task's adapter is selected at evaluation.

    Args:
        r: LoRA rank (> 0).
        alpha: LoRA scaling numerator (> 0); the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: layers to adapt (see :class:`cl_vla.policies.lora.LoRASettings`); ``None``: the
            policy's lerobot PEFT defaults where it has them, otherwise every Linear/Conv layer.
        train_base_on_first_task: train the whole model (no adapter) on task 0, then freeze it and add
            adapters from task 1 on. TAIL assumes a pretrained base; a model trained from scratch
            (tiny_vla) otherwise adapts a random one.
    """

    name = "lora_per_task"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | str | None = None,
        train_base_on_first_task: bool = False,
    ) -> None:
        self.settings = LoRASettings(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
        self.r, self.alpha, self.dropout = self.settings.r, self.settings.alpha, self.settings.dropout
        self.train_base_on_first_task = bool(train_base_on_first_task)
        self._policy: nn.Module | None = None
        self._tasks: list[int] = []  # tasks that have an adapter, in creation order
        self._current: int | None = None  # the task being trained (its adapter is the trainable one)
        self._pending: dict[int, dict[str, torch.Tensor]] = {}  # restored weights awaiting setup()

    @staticmethod
    def adapter_name(task_id: int) -> str:
        return f"task_{task_id}"

    @property
    def tasks_with_adapter(self) -> list[int]:
        return list(self._tasks)

    # ---- the seed's interface -----------------------------------------------------------------------

    def observe(self, batch: Mapping[str, Any], **kwargs: Any) -> None:
        """No-op: the adapter learns through the ordinary optimizer step."""

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """No-op: the next task's start freezes this adapter."""

    def state_dict(self) -> dict[str, Any]:
        """Config, which tasks have adapters, the task in training, and every adapter's weights."""
        adapters = {}
        for t in self._tasks:
            name = self.adapter_name(t)
            live = self._policy is not None and name in adapter_names(self._policy)
            adapters[name] = adapter_state(self._policy, name) if live else dict(self._pending[t])
        return {
            "name": self.name,
            "config": {**self.settings.to_dict(), "train_base_on_first_task": self.train_base_on_first_task},
            "tasks": list(self._tasks),
            "current": self._current,
            "adapters": adapters,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the adapters' list and weights; :meth:`setup` then (re)injects them into the policy."""
        _check_state_name(state, self.name)
        saved = dict(state["config"])
        mine = {**self.settings.to_dict(), "train_base_on_first_task": self.train_base_on_first_task}
        for key in ("r", "alpha", "dropout", "target_modules", "train_base_on_first_task"):
            if saved.get(key) != mine[key]:
                raise ConfigError(
                    f"algorithm.{key}={mine[key]!r} differs from the checkpoint's {saved.get(key)!r}; "
                    "resume with the value the run started with."
                )
        self.settings.resolved_targets = saved.get("resolved_targets")
        self._tasks = [int(t) for t in state["tasks"]]
        self._current = None if state["current"] is None else int(state["current"])
        adapters = state["adapters"]
        self._pending = {t: dict(adapters[self.adapter_name(t)]) for t in self._tasks}
        if self._policy is not None:
            self._install(self._policy)

    # ---- cl_vla hooks -----------------------------------------------------------------------------------

    def setup(self, module: Any) -> None:
        """Inject the adapters the restored state lists (before Lightning loads weights into them)."""
        self._install(module.policy)

    def on_task_start(self, task_id: int, context: TaskContext | None = None) -> None:
        """Add adapter ``task_<task_id>`` and make it the only trainable weights."""
        if context is not None and context.module is not None and self._policy is not context.module.policy:
            self._install(context.module.policy)
        policy = self._require_policy()
        self._current = task_id
        first_base = self.train_base_on_first_task and task_id == 0
        if not first_base and task_id not in self._tasks:
            inject_lora(policy, self.settings, self.adapter_name(task_id))
            self._tasks.append(task_id)
        self._apply_training_state()

    def eval_context(self, task_id: int, module: Any) -> AbstractContextManager:
        """Use adapter ``task_<task_id>``, or the base model alone when the task has none yet."""
        return self._using(task_id, module.policy)

    # ---- internals ----------------------------------------------------------------------------------------

    @contextmanager
    def _using(self, task_id: int, policy: nn.Module) -> Iterator[None]:
        # Evaluation may run inside a fit (within-task evaluations): put back exactly what was in use.
        previous = active_adapter(policy)
        flags = [p.requires_grad for p in policy.parameters()]
        activate_adapter(policy, self.adapter_name(task_id) if task_id in self._tasks else None)
        try:
            yield
        finally:
            activate_adapter(policy, previous)
            for p, flag in zip(policy.parameters(), flags, strict=True):
                p.requires_grad_(flag)

    def _require_policy(self) -> nn.Module:
        if self._policy is None:
            raise RuntimeError("PerTaskLoRA.setup(module) must run before the first task starts.")
        return self._policy

    def _install(self, policy: nn.Module) -> None:
        present = adapter_names(policy)
        wanted = {self.adapter_name(t) for t in self._tasks}
        foreign = [a for a in present if a not in wanted and not _ADAPTER_RE.fullmatch(a)]
        if foreign:
            raise ConfigError(
                f"algorithm=lora_per_task cannot run on a policy that already has LoRA adapter(s) {foreign} "
                "(drop the model's lora block: per-task adapters replace it)."
            )
        extra = [a for a in present if a not in wanted]
        if extra:
            raise ConfigError(
                f"The policy has LoRA adapter(s) {extra} that the restored state does not list."
            )
        # Re-created adapters get their saved weights (and Lightning's load) right after: their random
        # initialization must not consume the run's restored random stream.
        with torch.random.fork_rng(devices=[]):
            for t in self._tasks:
                if self.adapter_name(t) not in present:
                    inject_lora(policy, self.settings, self.adapter_name(t))
        for t, weights in self._pending.items():
            load_adapter_state(policy, self.adapter_name(t), weights)
        self._pending = {}
        self._policy = policy
        if self._current is not None:
            self._apply_training_state()

    def _apply_training_state(self) -> None:
        policy = self._require_policy()
        current = self._current if self._current in self._tasks else None
        adapter = None if current is None else self.adapter_name(current)
        activate_adapter(policy, adapter)
        set_trainable(policy, adapter, train_base=adapter is None)


__all__ = ["PerTaskLoRA"]
