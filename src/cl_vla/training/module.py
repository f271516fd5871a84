"""The LightningModule that trains any lerobot ``PreTrainedPolicy`` under a CL algorithm's hooks.

One training step: lerobot preprocessor (normalization, device) -> ``loss, info = policy(batch)`` ->
``loss + algorithm.penalty(...)`` -> backward -> ``algorithm.after_backward(...)`` -> optimizer step ->
``algorithm.observe(...)``. Penalties are added inside ``training_step`` because Lightning's
``on_before_backward`` cannot change the loss; gradient edits happen in ``on_after_backward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from cl_vla.algorithms.base import CLAlgorithm
from cl_vla.algorithms.sharded import reshard
from cl_vla.errors import CLVLAError


class NonFiniteLossError(CLVLAError):
    """The training loss became NaN or infinite."""


class CLPolicyModule(L.LightningModule):
    """Wraps a lerobot policy with its pre/post-processors, optimizer and the CL algorithm's hooks."""

    def __init__(
        self,
        policy: torch.nn.Module,
        preprocessor: Callable[[dict], dict],
        postprocessor: Callable[[Any], Any] | None,
        algorithm: CLAlgorithm,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        min_lr_ratio: float,
        steps_per_task: int,
        reset_optimizer_per_task: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.algorithm = algorithm
        self.lr, self.weight_decay = lr, weight_decay
        self.betas, self.eps = tuple(betas), eps
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.steps_per_task = steps_per_task
        self.reset_optimizer_per_task = reset_optimizer_per_task
        self.task = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._last_batch: dict | None = None
        #: Set by the loop when it resumes from a task-boundary checkpoint: it restored the weights itself
        #: before the new task's ``on_task_start`` (which may have added or changed parameters, e.g. a new
        #: LoRA adapter), so Lightning's restore keeps those weights instead of the checkpoint's.
        self.keep_weights_on_restore = False
        #: Called with the Lightning checkpoint dict on save/load; set by the loop (loop position,
        #: algorithm state, normalization statistics, RNG states live there).
        self.save_extra: Callable[[dict], None] | None = None
        self.load_extra: Callable[[dict], None] | None = None
        #: Called after every optimizer step with (task, step_in_task); the loop's periodic work.
        self.after_step: Callable[[int, int], None] | None = None
        # Only an algorithm with a penalty reads the parameters between forward and backward: the others
        # spare FSDP's root unit a second gather in every backward.
        self._has_penalty = getattr(type(algorithm), "penalty", None) is not CLAlgorithm.penalty
        #: ``trainer.fsdp_mixed_precision`` under ``strategy=fsdp`` ("none" or "bf16").
        self.fsdp_mixed_precision = "none"

    def configure_model(self) -> None:
        """Under ``strategy=fsdp`` (Lightning's ``ModelParallelStrategy`` sets ``device_mesh``), shard the
        policy per transformer block; a no-op under every other strategy and on later fits."""
        mesh = self._device_mesh
        if mesh is None:
            return
        from cl_vla.training.fsdp import shard_policy

        shard_policy(self.policy, mesh["data_parallel"], self.fsdp_mixed_precision)

    # ---- steps ------------------------------------------------------------------------------------

    def step_in_task(self) -> int:
        return self.global_step - self.task * self.steps_per_task

    def compute_loss(self, raw_batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        """Preprocess a raw DataLoader batch and run the policy; the algorithm hooks see this too."""
        batch = self.preprocessor(dict(raw_batch))
        # Called, not ``.forward``: FSDP gathers a sharded policy's root parameters in its forward hooks.
        loss, info = self.policy(batch)
        return loss, {"batch": batch, **(info or {})}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, outputs = self.compute_loss(batch)
        pre = outputs.pop("batch")
        if self._has_penalty:
            # The penalty sees every parameter as the shard its state is held for (FSDP; no-op else).
            reshard(self.policy)
        penalty = self.algorithm.penalty(self, pre, outputs)
        total = loss if penalty is None else loss + penalty
        if not torch.isfinite(total.detach()):
            raise NonFiniteLossError(
                f"The training loss became {total.item()} at task {self.task}, step {self.step_in_task()}; "
                "training stopped and the last good checkpoint is intact "
                "(lower trainer.lr or check the data)."
            )
        self._last_batch = pre
        bs = len(next(iter(v for v in pre.values() if isinstance(v, torch.Tensor))))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        if penalty is not None:
            self.log("train/penalty", penalty.detach(), batch_size=bs)
        self.log("train/task", float(self.task), batch_size=bs)
        for k, v in outputs.items():
            if isinstance(v, int | float) and k != "loss":
                self.log(f"train/{k}", float(v), batch_size=bs)
        return total

    def on_after_backward(self) -> None:
        if self._last_batch is not None:
            self.algorithm.after_backward(self, self._last_batch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.algorithm.observe(self._last_batch or batch, module=self, outputs=outputs)
        self._last_batch = None
        if self.after_step is not None:
            self.after_step(self.task, self.step_in_task())

    # ---- optimization -------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        # Lightning calls this at every fit, i.e. at every task: a fresh optimizer unless configured
        # to carry its moments across tasks.
        groups = self._trainable_groups()
        if self._optimizer is None or self.reset_optimizer_per_task:
            # One peak rate for every group (the schedule scales it), whatever a policy's groups say.
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
            self._optimizer = torch.optim.AdamW(
                groups, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps
            )
        elif _param_ids(groups) != _param_ids(self._optimizer.param_groups):
            raise CLVLAError(
                f"trainer.reset_optimizer_per_task=false cannot carry the optimizer into task {self.task}: "
                f"algorithm {self.algorithm.name!r} changed which parameters train at the task boundary "
                "(the kept optimizer would not update the new ones); "
                "use trainer.reset_optimizer_per_task=true."
            )
        # Warmup + cosine decay restarted at every task: a new scheduler per task's fit, stepped after
        # every optimizer step and checkpointed by Lightning, so a resumed run keeps the same rates.
        schedule = torch.optim.lr_scheduler.LambdaLR(self._optimizer, self.lr_factor)
        return {"optimizer": self._optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _trainable_groups(self) -> list[dict]:
        """The policy's own parameter groups (lerobot's ``get_optim_params``), keeping only parameters
        that train: algorithms freeze some (PackNet, LoRA adapters) before each task's fit."""
        params = self.policy.get_optim_params() if hasattr(self.policy, "get_optim_params") else None
        params = list(params if params is not None else self.policy.parameters())
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        out = []
        for g in groups:
            kept = [p for p in g["params"] if p.requires_grad]
            if kept:
                out.append({**g, "params": kept})
        return out

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    def lr_factor(self, s: int) -> float:
        """Linear warmup then cosine decay to ``min_lr_ratio``, restarted at every task."""
        if s < self.warmup_steps:
            return (s + 1) / (self.warmup_steps + 1)
        span = max(1, self.steps_per_task - self.warmup_steps)
        progress = min(1.0, (s - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # ---- checkpoint extras ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.save_extra is not None:
            self.save_extra(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        _start_fresh_epoch_after_completed_one(checkpoint)
        if self.keep_weights_on_restore:
            # A task-boundary resume: weights restored and the new task started (see the attribute).
            # Its optimizer is the one an uninterrupted run builds for the task: fresh when reset per
            # task (nothing of the checkpoint's to load), else the checkpoint's, carried on.
            checkpoint["state_dict"] = self.state_dict()
            if self.reset_optimizer_per_task:
                checkpoint["optimizer_states"] = []
            else:
                _set_saved_lr(checkpoint, self.lr * self.lr_factor(0))
            checkpoint["lr_schedulers"] = []  # the new task's schedule starts at its first step
            self.keep_weights_on_restore = False
        elif not checkpoint.get("lr_schedulers") and checkpoint.get("optimizer_states"):
            self._schedule_for_legacy_checkpoint(checkpoint)
        if self.load_extra is not None:
            self.load_extra(checkpoint)

    def _schedule_for_legacy_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written before the schedule was a ``LambdaLR`` hold no scheduler state (the rate
        was set by hand before each step). A mid-task one gets the state the scheduler would have had:
        the schedule is a function of the step in the task only."""
        done = int(checkpoint["global_step"]) - self.task * self.steps_per_task
        groups = checkpoint["optimizer_states"][0]["param_groups"]
        probe = torch.optim.SGD([{"params": [torch.zeros(1)]} for _ in groups], lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(probe, self.lr_factor)
        lr = self.lr * self.lr_factor(done)
        checkpoint["lr_schedulers"] = [
            {
                **schedule.state_dict(),
                "last_epoch": done,
                "_step_count": done + 1,
                "_last_lr": [lr] * len(groups),
            }
        ]
        _set_saved_lr(checkpoint, lr)


def _set_saved_lr(checkpoint: dict, lr: float) -> None:
    for state in checkpoint.get("optimizer_states") or []:
        for group in state["param_groups"]:
            group["lr"] = lr


def _param_ids(groups: list[dict]) -> set[int]:
    return {id(p) for g in groups for p in g["params"]}


def _start_fresh_epoch_after_completed_one(checkpoint: dict) -> None:
    """A checkpoint written at a task boundary holds a completed epoch whose in-epoch batch counter
    is full. Lightning restores that counter into the next task's epoch, ends it after one batch and
    starts another that replays the task's first batches. An uninterrupted run starts the next
    task's epoch at zero, so the restored counter is reset the same way."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    epoch, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epoch or not batches:
        return
    if epoch["current"]["completed"] == epoch["current"]["ready"]:
        batches["current"] = {k: 0 for k in batches["current"]}
        batches["is_last_batch"] = False
