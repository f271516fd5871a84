"""One run's state and wiring: the policy, its LightningModule, the data, the Trainer, the loggers and
the run state; how it evaluates, checkpoints and hands algorithms their :class:`TaskContext`.

:func:`cl_vla.training.loop.run_continual` drives it through the tasks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.algorithms.memory_prefetch import memory_workers
from cl_vla.algorithms.sharded import reshard
from cl_vla.data.datamodule import ContinualDataModule
from cl_vla.data.stats import NormalizationChoice, flatten_stats, select_stats, unflatten_stats
from cl_vla.data.streams import ContinualData
from cl_vla.evaluation.heldout import evaluate_heldout
from cl_vla.tracking.log_continuity import LOG_MARKS_KEY, log_marks
from cl_vla.tracking.loggers import TaskProgressBar, build_loggers
from cl_vla.training.checkpointing import (
    STATE_FILE,
    AtomicCheckpointIO,
    RunState,
    atomic_write_json,
    rng_state,
    set_rng_state,
    state_digests,
)
from cl_vla.training.module import CLPolicyModule
from cl_vla.training.run_dir import RunHandle, record_dataset
from cl_vla.training.trainer import build_trainer
from cl_vla.training.within_task import BestWithinTask

log = logging.getLogger(__name__)


class ContinualRun:
    """State and wiring of one run; :func:`run_continual` drives it."""

    def __init__(
        self, cfg: DictConfig, data: ContinualData, policy_cfg: Any, algorithm: CLAlgorithm, handle: RunHandle
    ) -> None:
        self.cfg, self.data, self.algorithm = cfg, data, algorithm
        self.S = int(cfg.continual_learning.steps_per_task)
        self.T = data.num_tasks
        self.run_dir = handle.run_dir
        point = handle.resume
        if handle.lock is not None and (point is None or point.ckpt is None):
            record_dataset(self.run_dir, cfg)  # what a resume's data.root must still hold
        self.resume_ckpt: Path | None = point.ckpt if point else None
        self.resume_payload: dict | None = point.payload if point else None
        if point is not None and point.state is not None:
            self.state = point.state
        else:
            self.state = RunState(self.T, data.task_names, handle.fingerprint)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # eval.keep_best_within_task: LIBERO's protocol (sim: success, higher is better; else loss).
        self.best = (
            BestWithinTask(higher_is_better=cfg.eval.type == "sim")
            if cfg.eval.get("keep_best_within_task", False)
            else None
        )
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)

        from cl_vla.policies.factory import make_policy  # lerobot's, in a tiny twin's build context

        self.policy_cfg = policy_cfg
        self.policy = make_policy(policy_cfg, ds_meta=data.dataset.meta)
        from cl_vla.policies.lora import apply_model_lora

        apply_model_lora(self.policy, cfg.model.get("lora"))  # plain LoRA fine-tuning, when configured
        self.norm = NormalizationChoice.parse(cfg.data.normalization)
        self.stats: dict | None = None
        t = cfg.trainer
        from cl_vla.policies.recipe import training_recipe

        # The policy's own lerobot presets (model.recipe=policy, the hub VLAs) or the trainer group's.
        self.recipe = training_recipe(cfg.model.get("recipe"), policy_cfg, t, self.S)
        self.module = CLPolicyModule(
            self.policy,
            lambda b: b,
            None,
            algorithm,
            **self.recipe.module_kwargs(),
            steps_per_task=self.S,
            reset_optimizer_per_task=t.reset_optimizer_per_task,
        )
        self.module.fsdp_mixed_precision = str(t.get("fsdp_mixed_precision", "none"))
        algorithm.setup(self.module)
        self.module.save_extra = self._save_extra
        self.module.load_extra = self._load_extra
        self.module.after_step = self._after_step
        self.dm = ContinualDataModule(
            data,
            algorithm,
            batch_size=cfg.data.batch_size,
            eval_batch_size=cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers,
            seed=int(cfg.seed),
            steps_per_task=self.S,
        )
        self.loggers = build_loggers(cfg, self.run_dir, self.run_dir.name, handle.logs)
        self.progress = TaskProgressBar(self.T, data.task_names) if t.progress_bar else None
        self.ckpt_io = AtomicCheckpointIO()
        self.trainer = build_trainer(
            cfg,
            self.run_dir,
            max_steps=self.S,
            loggers=self.loggers,
            callbacks=[self.progress] if self.progress else [],
            plugins=[self.ckpt_io],
            grad_clip_norm=self.recipe.grad_clip_norm,
        )

    # ---- normalization ------------------------------------------------------------------------------

    def _use_stats(self, stats: dict) -> None:
        from cl_vla.policies.factory import make_processors

        self.stats = stats
        pre, post = make_processors(self.policy_cfg, stats)
        self.module.preprocessor, self.module.postprocessor = pre, post

    def _stats_for_task(self, task: int) -> None:
        if self.stats is not None and (self.norm is not NormalizationChoice.SEEN_TASKS or task == 0):
            return  # dataset / first-task statistics are decided once and kept (and restored on resume)
        train_eps = [s.train_episodes for s in self.data.streams]
        self._use_stats(select_stats(self.norm, self.data.dataset.meta, train_eps, task))

    # ---- checkpoint extras --------------------------------------------------------------------------

    def _save_extra(self, ckpt: dict) -> None:
        ckpt["cl_vla"] = {
            "state": json.dumps(self.state.to_json()),
            "second": json.dumps(self.second),
            "algorithm": self.algorithm.state_dict(),
            "normalization": flatten_stats(self.stats or {}),
            "rng": rng_state(),
            # The CSV rows on disk now (flushed first): a resume from this checkpoint keeps exactly them.
            LOG_MARKS_KEY: json.dumps(log_marks(self.loggers)),
        }
        if self.best is not None:  # mid-task: the best weights so far; at a task's end: empty
            ckpt["cl_vla"]["best_within_task"] = self.best.state_dict()

    def _load_extra(self, ckpt: dict) -> None:
        extra = ckpt["cl_vla"]
        if "second" in extra:
            self.second = json.loads(extra["second"])
        self.algorithm.load_state_dict(extra["algorithm"])
        self._use_stats(
            {k: {s: v for s, v in d.items()} for k, d in unflatten_stats(extra["normalization"]).items()}
        )
        set_rng_state(extra["rng"])
        if self.best is not None:
            self.best.load_state_dict(extra.get("best_within_task", {}))

    def save(self, name: str) -> None:
        path = self.ckpt_dir / name
        self.state.checkpoint = name
        self.trainer.save_checkpoint(path, weights_only=False)
        if self.trainer.is_global_zero:
            digests = {**state_digests(self.ckpt_dir), **self.ckpt_io.digests}
            atomic_write_json(
                self.ckpt_dir / STATE_FILE, {"checkpoint": name, **self.state.to_json(), "digests": digests}
            )

    def _after_step(self, task: int, step: int) -> None:
        self.state.task, self.state.step_in_task = task, step
        k = int(self.cfg.eval.within_task_evals)
        # Evaluated before a checkpoint of the same step, which must hold the point (and, under
        # keep_best, its weights): a run resumed from it continues after this step.
        if k > 0 and step in {round(self.S * (i + 1) / (k + 1)) for i in range(k)}:
            self.within_task_point(task)
        every = int(self.cfg.trainer.checkpoint_every_n_steps)
        if every > 0 and step % every == 0 and step < self.S:
            self.save("last.ckpt")

    def within_task_point(self, task: int) -> None:
        """Evaluate the current task now: one point of its curve (and, under keep_best, a candidate)."""
        value = self._evaluate([task])[0]
        self.state.within_task[task].append(value)
        if self.best is not None:
            self.best.offer(self.module, value)

    def restore_best_within_task(self, task: int) -> None:
        """keep_best: the curve's last point at the task's last step, then the best weights back."""
        assert self.best is not None
        self.within_task_point(task)
        self.best.restore(self.module)
        self.best.clear()

    # eval=sim: R holds closed-loop success; the held-out loss stays as a second matrix, `second`.
    second: dict[str, Any] | None = None
    sim: Any = None

    def _evaluate(self, tasks: list[int]) -> list[float]:
        if self.cfg.eval.type == "sim":
            if self.sim is None:
                from cl_vla.evaluation.simulators import make_sim_evaluator
                from cl_vla.tracking.loggers import wandb_run

                self.sim = make_sim_evaluator(
                    self.cfg, self.data, self.policy_cfg, self.run_dir, lambda: wandb_run(self.loggers)
                )
            st = self.state
            label = (
                "baseline"
                if self.trainer.global_step == 0
                else f"task{st.task:02d}_step{st.step_in_task:05d}"
            )
            return self.sim.evaluate(self.module, tasks, label=label)
        return self._heldout(tasks)

    def baseline(self) -> list[float]:
        """The untrained policy's row over every task; under eval=sim from the cache when it holds it."""
        every = list(range(self.T))
        if self.cfg.eval.type != "sim" or not self.cfg.eval.cache_baseline:
            return self._evaluate(every)
        from cl_vla.evaluation.baseline_cache import baseline_key, baseline_row

        key = baseline_key(self.cfg, self.policy, self.stats or {}, self.algorithm)
        timeouts = self.sim.stats.timeouts if self.sim is not None else 0
        row, cached = baseline_row(
            key, self.T, lambda: self._evaluate(every), agree=self._all_ranks, write=False
        )
        # A row cut short by eval.timeout_s counts unfinished episodes as failures: not kept.
        if not cached and self.trainer.is_global_zero and self.sim.stats.timeouts == timeouts:
            from cl_vla.evaluation.baseline_cache import store_row

            store_row(key, row)
        if cached and self.trainer.is_global_zero:
            log.info("baseline row from the cache (%s): %s", key[:12], ", ".join(f"{v:.2f}" for v in row))
        return row

    def _all_ranks(self, flag: bool) -> bool:
        if self.trainer.world_size <= 1:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.module.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def _heldout(self, tasks: list[int]) -> list[float]:
        return evaluate_heldout(
            self.module, self.dm, tasks, max_batches=self.cfg.eval.max_batches, seed=int(self.cfg.seed)
        )

    def context(self, task: int) -> TaskContext:
        reshard(self.policy)  # an evaluation's forward leaves a sharded root gathered
        return TaskContext(
            task_id=task,
            task_name=self.data.task_names[task],
            num_tasks=self.T,
            module=self.module,
            train_dataset=self.data.train_dataset(task),
            make_loader=self.dm.loader,
            memory_workers=memory_workers(
                self.cfg.data.get("memory_workers", "auto"),
                int(self.cfg.data.num_workers),
                accelerated=self.module.device.type != "cpu",
            ),
            compute_loss=self.module.compute_loss,
            device=self.module.device,
            world_size=self.trainer.world_size,
            rank=self.trainer.global_rank,
        )
