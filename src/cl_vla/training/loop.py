"""The continual loop: one Lightning Trainer carried through every task of the sequence.

One Trainer (not one per task) keeps a single monotonic global step, one set of loggers and one DDP
process group for the whole run; each task is one ``trainer.fit`` whose ``max_steps`` is raised to the
task's end (Lightning counts steps across fits; ``fit_loop.epoch_loop.max_steps`` is settable). The
loop never looks at the algorithm's type: everything an algorithm does goes through its hooks.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console

from cl_vla.algorithms.base import CLAlgorithm, TaskContext
from cl_vla.data.datamodule import ContinualDataModule
from cl_vla.data.stats import NormalizationChoice, flatten_stats, select_stats, unflatten_stats
from cl_vla.data.streams import ContinualData
from cl_vla.evaluation.heldout import evaluate_heldout
from cl_vla.tracking.loggers import TaskProgressBar, build_loggers, log_final, log_row
from cl_vla.training.checkpointing import (
    STATE_FILE,
    AtomicCheckpointIO,
    RunState,
    atomic_write_json,
    rng_state,
    set_rng_state,
)
from cl_vla.training.module import CLPolicyModule
from cl_vla.training.run_dir import RunHandle, open_run


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
        self.resume_ckpt: Path | None = point.ckpt if point else None
        self.resume_payload: dict | None = point.payload if point else None
        if point is not None and point.state is not None:
            self.state = point.state
        else:
            self.state = RunState(self.T, data.task_names, handle.fingerprint)
        self.ckpt_dir = self.run_dir / "checkpoints"
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
        self.loggers = build_loggers(cfg, self.run_dir, self.run_dir.name)
        self.progress = TaskProgressBar(self.T, data.task_names) if t.progress_bar else None
        self.ckpt_io = AtomicCheckpointIO()
        self.trainer = L.Trainer(
            accelerator=t.accelerator,
            devices=t.devices,
            strategy=t.strategy,
            num_nodes=t.num_nodes,
            precision=t.precision,
            max_steps=self.S,
            max_epochs=-1,
            logger=self.loggers or False,
            callbacks=[self.progress] if self.progress else [],
            enable_progress_bar=self.progress is not None,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            log_every_n_steps=t.log_every_n_steps,
            gradient_clip_val=self.recipe.grad_clip_norm,
            deterministic=t.deterministic or None,
            default_root_dir=str(self.run_dir),
            plugins=[self.ckpt_io],
            reload_dataloaders_every_n_epochs=1,
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
        }

    def _load_extra(self, ckpt: dict) -> None:
        extra = ckpt["cl_vla"]
        if "second" in extra:
            self.second = json.loads(extra["second"])
        self.algorithm.load_state_dict(extra["algorithm"])
        self._use_stats(
            {k: {s: v for s, v in d.items()} for k, d in unflatten_stats(extra["normalization"]).items()}
        )
        set_rng_state(extra["rng"])

    def save(self, name: str) -> None:
        path = self.ckpt_dir / name
        self.state.checkpoint = name
        self.trainer.save_checkpoint(path, weights_only=False)
        if self.trainer.is_global_zero:
            atomic_write_json(self.ckpt_dir / STATE_FILE, {"checkpoint": name, **self.state.to_json()})

    def _after_step(self, task: int, step: int) -> None:
        self.state.task, self.state.step_in_task = task, step
        every = int(self.cfg.trainer.checkpoint_every_n_steps)
        if every > 0 and step % every == 0 and step < self.S:
            self.save("last.ckpt")
        k = int(self.cfg.eval.within_task_evals)
        if k > 0 and step in {round(self.S * (i + 1) / (k + 1)) for i in range(k)}:
            self.state.within_task[task].append(self._evaluate([task])[0])

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

    def _heldout(self, tasks: list[int]) -> list[float]:
        return evaluate_heldout(
            self.module, self.dm, tasks, max_batches=self.cfg.eval.max_batches, seed=int(self.cfg.seed)
        )

    def context(self, task: int) -> TaskContext:
        return TaskContext(
            task_id=task,
            task_name=self.data.task_names[task],
            num_tasks=self.T,
            module=self.module,
            train_dataset=self.data.train_dataset(task),
            make_loader=self.dm.loader,
            compute_loss=self.module.compute_loss,
            device=self.module.device,
            world_size=self.trainer.world_size,
            rank=self.trainer.global_rank,
        )


def run_continual(
    cfg: DictConfig,
    data: ContinualData,
    policy_cfg: Any,
    algorithm: CLAlgorithm,
    console: Console | None = None,
    handle: RunHandle | None = None,
) -> float | None:
    """Train through every task, evaluating all tasks after each; returns the final average score.

    ``handle`` is the claimed run directory (:func:`cl_vla.training.run_dir.open_run`); without one it is
    claimed here and released at the end.
    """
    console = console or Console()
    own = handle is None
    handle = handle or open_run(cfg)
    try:
        return _run(cfg, data, policy_cfg, algorithm, console, handle)
    finally:
        if own:
            handle.close()


def _run(cfg, data, policy_cfg, algorithm, console: Console, handle: RunHandle) -> float | None:
    run = ContinualRun(cfg, data, policy_cfg, algorithm, handle)
    st, T, S = run.state, run.T, run.S
    from cl_vla.training.memory_plan import check_run

    # What the CL state will cost over the sequence; refused here, not by an out-of-memory error hours in.
    check_run(cfg, run.policy, T, console.print if run.trainer.is_global_zero else lambda _: None)
    if handle.resume is not None and run.resume_ckpt is None:
        console.print(
            f"{run.run_dir} stopped before its first checkpoint: nothing to continue, "
            "starting it again from the beginning"
        )
    if run.resume_ckpt is not None:
        console.print(f"resuming {run.run_dir} at task {st.task + 1}/{T}, step {st.step_in_task}")
        # Our part of the checkpoint is restored here, once; Lightning restores weights, optimizer and
        # step counters in the first fit. Doing it before the fit lets a task-boundary resume run the
        # new task's on_task_start on top of the restored state, as the uninterrupted run did.
        ckpt = run.resume_payload
        assert ckpt is not None
        run._load_extra(ckpt)
        run.module.load_extra = None
        algorithm.setup(run.module)
        _reattach(run)
        if st.step_in_task == 0 and st.task < T:
            # The new task's on_task_start must see the previous task's weights, as it did in the
            # uninterrupted run; Lightning's own restore (inside fit) would come after it.
            run.module.load_state_dict(ckpt["state_dict"])
            run.module.keep_weights_on_restore = True
        # Lightning's restore in the first fit takes this payload instead of reading the file again.
        run.ckpt_io.hand_over(run.resume_ckpt, ckpt)
        run.resume_payload = ckpt = None
    else:
        run._stats_for_task(0)
        st.baseline = run._evaluate(list(range(T)))  # the untrained policy: FWT's reference b_j
        if cfg.eval.type == "sim":
            run.second = {"R": [[None] * T for _ in range(T)], "baseline": run._heldout(list(range(T)))}
    ckpt_path = run.resume_ckpt
    for t in range(st.task, T):
        start = st.step_in_task if t == st.task else 0
        run.module.task = t
        if run.progress:
            run.progress.task = t
        ctx = run.context(t)
        if start == 0:
            run._stats_for_task(t)
            algorithm.on_task_start(t, ctx)
            if int(cfg.eval.within_task_evals) > 0:  # LIBERO's curve starts with a zero-shot point
                st.within_task[t] = [run._evaluate([t])[0]]
        if start < S:
            run.dm.set_task(t, start)
            run.trainer.fit_loop.epoch_loop.max_steps = (t + 1) * S
            tic = time.perf_counter()
            with warnings.catch_warnings():
                # Lightning cannot see that our batch sampler restarts a task at the checkpoint's step
                # (batches are a function of seed, task, rank and step; tests/test_loop_e2e.py checks a
                # mid-task resume is exact), so it would call every mid-task resume unreliable.
                warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
                run.trainer.fit(run.module, datamodule=run.dm, ckpt_path=ckpt_path, weights_only=True)
            st.train_seconds[t] += time.perf_counter() - tic
            ckpt_path = None
        algorithm.on_task_end(t, run.context(t))
        tasks = list(range(T)) if cfg.eval.evaluate_unseen else list(range(t + 1))
        tic = time.perf_counter()
        row = run._evaluate(tasks)
        st.eval_seconds[t] += time.perf_counter() - tic
        st.R[t] = [row[tasks.index(j)] if j in tasks else None for j in range(T)]
        if run.second is not None:
            loss = run._heldout(tasks)
            run.second["R"][t] = [loss[tasks.index(j)] if j in tasks else None for j in range(T)]
            log_row(
                run.loggers,
                t,
                [np.nan if v is None else v for v in run.second["R"][t]],
                run.trainer.global_step,
                prefix="eval_heldout",
            )
        st.within_task[t].append(st.R[t][t])
        st.task, st.step_in_task = t + 1, 0
        log_row(run.loggers, t, [np.nan if v is None else v for v in st.R[t]], run.trainer.global_step)
        _record_rank_state(run)
        if cfg.continual_learning.save_checkpoint_per_task or t == T - 1:
            run.save(f"task_{t:02d}.ckpt")
        if cfg.continual_learning.export_per_task and run.trainer.is_global_zero:
            from cl_vla.policies.export import export_task

            with algorithm.eval_context(t, run.module):  # the policy as task t is evaluated
                export_task(run.run_dir, t, run.policy, run.module.preprocessor, run.module.postprocessor)
    st.finished = True
    return _finish(run, console)


def _reattach(run: ContinualRun) -> None:
    """Give algorithms that keep dataset references their datasets back after a restore."""
    attach = getattr(run.algorithm, "attach_dataset", None)
    if attach is None:
        return
    for t in range(run.state.task):  # tasks whose on_task_end has run
        attach(t, run.data.train_dataset(t))


def _record_rank_state(run: ContinualRun) -> None:
    """Under DDP, each rank writes a digest of its algorithm state so ranks can be checked to agree."""
    if run.trainer.world_size <= 1:
        return
    digest = hashlib.sha256()
    _hash_into(digest, run.algorithm.state_dict())
    atomic_write_json(
        run.run_dir / "rank_states" / f"rank{run.trainer.global_rank}.json",
        {"task": run.state.task - 1, "sha256": digest.hexdigest()},
    )


def _hash_into(digest: Any, obj: Any) -> None:
    """Feed a state (tensors by their bytes, containers in key order) into ``digest``."""
    if isinstance(obj, torch.Tensor):
        digest.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            digest.update(str(k).encode())
            _hash_into(digest, obj[k])
    elif isinstance(obj, list | tuple):
        for x in obj:
            _hash_into(digest, x)
    else:
        digest.update(repr(obj).encode())


def _finish(run: ContinualRun, console: Console) -> float | None:
    from cl_vla.evaluation.metrics import compute_metrics
    from cl_vla.results.run_files import heatmap_figure, print_summary, write_results

    st = run.state
    R = st.matrix()
    within = [w for w in st.within_task] if any(len(w) > 1 for w in st.within_task) else None
    sim = run.cfg.eval.type == "sim"  # R: success rate (higher is better); else held-out loss (lower)
    name, label = ("success_rate", "success rate") if sim else ("heldout_action_loss", "held-out action loss")
    metrics = compute_metrics(R, higher_is_better=sim, baseline=st.baseline, within_task=within)
    second: dict[str, Any] = {}
    if run.second is not None:
        loss = np.array([[np.nan if v is None else v for v in row] for row in run.second["R"]], dtype=float)
        second = {
            "heldout_action_loss": {
                "matrix": loss,
                "baseline": run.second["baseline"],
                "higher_is_better": False,
                "metrics": compute_metrics(loss, higher_is_better=False, baseline=run.second["baseline"]),
            }
        }
    if run.sim is not None:
        second["sim"] = run.sim.stats.to_json()
        run.sim.close()
    if run.trainer.is_global_zero:
        write_results(
            run.run_dir,
            R,
            st.task_names,
            metrics=metrics,
            higher_is_better=sim,
            metric_name=name,
            extra={
                **second,
                "algorithm": run.cfg.algorithm.get("name"),
                "model": run.cfg.model.type,
                "seed": int(run.cfg.seed),
                "baseline": st.baseline,
                "steps_per_task": run.S,
                "global_step": run.trainer.global_step,
                "train_seconds": st.train_seconds,
                "eval_seconds": st.eval_seconds,
                "algorithm_state_bytes": _state_bytes(run.algorithm),
            },
        )
        print_summary(console, R, st.task_names, metrics, higher_is_better=sim, metric_name=label)
        fig = heatmap_figure(R, st.task_names, higher_is_better=sim, metric_name=label)
        log_final(run.loggers, R, st.task_names, metrics, fig)
        if "heldout_action_loss" in second:
            _report_second(run, console, second["heldout_action_loss"])
        import matplotlib.pyplot as plt

        plt.close(fig)
    for lg in run.loggers:
        lg.finalize("success")
    import wandb

    if wandb.run is not None:
        wandb.finish()
    if run.trainer.is_global_zero:
        # Last line of a run: where its results.json, R matrix, plots and checkpoints are.
        console.print(f"run directory: {run.run_dir}", soft_wrap=True, highlight=False)
    acc = metrics.get("acc")
    return float(acc) if acc is not None else None


def _report_second(run: ContinualRun, console: Console, second: dict[str, Any]) -> None:
    """eval=sim: the held-out loss matrix, printed after the success matrix and logged to W&B."""
    from cl_vla.results.run_files import format_matrix_table
    from cl_vla.tracking.loggers import wandb_run

    loss, names = second["matrix"], run.state.task_names
    console.print(
        format_matrix_table(
            loss, names, second["metrics"], higher_is_better=False, metric_name="held-out action loss"
        )
    )
    wb = wandb_run(run.loggers)
    if wb is not None:
        import wandb

        cols = ["after_task", *[f"{j}: {n[:40]}" for j, n in enumerate(names)]]
        rows = [[i, *[None if not np.isfinite(v) else float(v) for v in loss[i]]] for i in range(len(loss))]
        wb.log({"cl/heldout_R_matrix": wandb.Table(columns=cols, data=rows)})
        for k, v in second["metrics"].items():
            if isinstance(v, int | float):
                wb.summary[f"cl/heldout/{k}"] = v
        stats = run.sim.stats.to_json() if run.sim is not None else {}
        for k in ("env_steps", "seconds", "env_steps_per_s"):
            if stats.get(k) is not None:
                wb.summary[f"sim/{k}"] = stats[k]


def _state_bytes(algorithm: CLAlgorithm) -> int:
    """Approximate bytes the algorithm keeps (its memory footprint beyond the policy)."""
    memory = getattr(algorithm, "memory_bytes", None)
    if memory is not None:
        return int(memory())
    total = 0
    stack: list[Any] = [algorithm.state_dict()]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack += list(x.values())
        elif isinstance(x, list | tuple):
            stack += list(x)
    return total
