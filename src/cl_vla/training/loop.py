"""The continual loop: one Lightning Trainer carried through every task of the sequence.

One Trainer (not one per task) keeps a single monotonic global step, one set of loggers and one DDP
process group for the whole run; each task is one ``trainer.fit`` whose ``max_steps`` is raised to the
task's end (Lightning counts steps across fits; ``fit_loop.epoch_loop.max_steps`` is settable). The
loop never looks at the algorithm's type: everything an algorithm does goes through its hooks.

Per task ``t``: normalization statistics, ``on_task_start``, ``fit`` to the task's last step,
``on_task_end``, evaluation of every task (row ``t`` of R), the task's checkpoint, its export.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
from omegaconf import DictConfig
from rich.console import Console

from cl_vla.algorithms.base import CLAlgorithm
from cl_vla.data.streams import ContinualData
from cl_vla.tracking.loggers import log_row
from cl_vla.training.checkpointing import set_rng_state
from cl_vla.training.continual_run import ContinualRun
from cl_vla.training.rank_digest import record_rank_state
from cl_vla.training.run_dir import RunHandle, open_run


def run_continual(
    cfg: DictConfig,
    data: ContinualData,
    policy_cfg: Any,
    algorithm: CLAlgorithm,
    console: Console | None = None,
    handle: RunHandle | None = None,
) -> float | None:
    """Train through every task, evaluating all tasks after each; returns the final average score.

    ``handle`` is the claimed run directory (:func:`cl_vla.training.run_dir.open_run`); without one it
    is claimed here and released at the end.
    """
    console = console or Console()
    own = handle is None
    handle = handle or open_run(cfg)
    try:
        run = ContinualRun(cfg, data, policy_cfg, algorithm, handle)
        from cl_vla.training.memory_plan import check_run

        # What the CL state will cost over the sequence; refused here, not by an out-of-memory error hours in.
        check_run(cfg, run.policy, run.T, console.print if run.trainer.is_global_zero else lambda _: None)
        if run.resume_ckpt is not None:
            _restore(run, console)
        else:
            _start(run, console, resumed=handle.resume is not None)
        for t in range(run.state.task, run.T):
            _train_task(run, t)
            _end_task(run, t)
        run.state.finished = True
        from cl_vla.results.summary import finish_run

        return finish_run(run, console)
    finally:
        if own:
            handle.close()


def _start(run: ContinualRun, console: Console, resumed: bool) -> None:
    """A new run: the untrained policy's row (FWT's reference b_j) before any training."""
    if resumed:
        console.print(
            f"{run.run_dir} stopped before its first checkpoint: nothing to continue, "
            "starting it again from the beginning"
        )
    run._stats_for_task(0)
    run.state.baseline = run.baseline()
    if run.cfg.eval.type == "sim":
        every = list(range(run.T))
        run.second = {"R": [[None] * run.T for _ in range(run.T)], "baseline": run._heldout(every)}


def _restore(run: ContinualRun, console: Console) -> None:
    """Our part of the checkpoint is restored here, once; Lightning restores weights, optimizer and
    step counters in the first fit. Doing it before the fit lets a task-boundary resume run the new
    task's on_task_start on top of the restored state, as the uninterrupted run did."""
    st, ckpt = run.state, run.resume_payload
    assert ckpt is not None and run.resume_ckpt is not None
    console.print(f"resuming {run.run_dir} at task {st.task + 1}/{run.T}, step {st.step_in_task}")
    run._load_extra(ckpt)
    run.module.load_extra = None
    if st.step_in_task > 0:
        # DDP and FSDP re-seed the global RNG as every fit starts (Lightning's reset_seed): a mid-task
        # resume sets the step's saved RNG again once the fit has begun, before its first batch.
        rng = ckpt["cl_vla"]["rng"]
        run.module.load_extra = lambda _checkpoint: set_rng_state(rng)
    run.algorithm.setup(run.module)
    attach = getattr(run.algorithm, "attach_dataset", None)
    for t in range(st.task) if attach is not None else ():  # datasets of tasks whose on_task_end ran
        attach(t, run.data.train_dataset(t))
    if st.step_in_task == 0 and st.task < run.T:
        # The new task's on_task_start must see the previous task's weights, as it did in the
        # uninterrupted run; Lightning's own restore (inside fit) would come after it.
        run.module.load_state_dict(ckpt["state_dict"])
        run.module.keep_weights_on_restore = True
    # Lightning's restore in the first fit takes this payload instead of reading the file again.
    run.ckpt_io.hand_over(run.resume_ckpt, ckpt)
    run.resume_payload = None


def _train_task(run: ContinualRun, t: int) -> None:
    st, S = run.state, run.S
    start = st.step_in_task if t == st.task else 0
    run.module.task = t
    if run.progress:
        run.progress.task = t
    if start == 0:
        run._stats_for_task(t)
        run.algorithm.on_task_start(t, run.context(t))
        if int(run.cfg.eval.within_task_evals) > 0:  # LIBERO's curve starts with a zero-shot point
            st.within_task[t] = []
            if run.best is not None:
                run.best.clear()
            run.within_task_point(t)
    if start < S:
        run.dm.set_task(t, start)
        run.trainer.fit_loop.epoch_loop.max_steps = (t + 1) * S
        tic = time.perf_counter()
        with warnings.catch_warnings():
            # Lightning cannot see that our batch sampler restarts a task at the checkpoint's step
            # (batches are a function of seed, task, rank and step; tests/test_loop_e2e.py checks a
            # mid-task resume is exact), so it would call every mid-task resume unreliable.
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended")
            run.trainer.fit(run.module, datamodule=run.dm, ckpt_path=run.resume_ckpt, weights_only=True)
        st.train_seconds[t] += time.perf_counter() - tic
        run.resume_ckpt = None


def _end_task(run: ContinualRun, t: int) -> None:
    """``on_task_end``, row ``t`` of R (and of the held-out matrix under eval=sim), checkpoint, export."""
    st, cfg = run.state, run.cfg
    if run.best is not None:  # LIBERO: the best within-task weights, before end_task and evaluation
        run.restore_best_within_task(t)
    run.algorithm.on_task_end(t, run.context(t))
    tasks = list(range(run.T)) if cfg.eval.evaluate_unseen else list(range(t + 1))
    tic = time.perf_counter()
    row = run._evaluate(tasks)
    st.eval_seconds[t] += time.perf_counter() - tic
    st.R[t] = [row[tasks.index(j)] if j in tasks else None for j in range(run.T)]
    if run.second is not None:
        loss = run._heldout(tasks)
        run.second["R"][t] = [loss[tasks.index(j)] if j in tasks else None for j in range(run.T)]
        _log_row(run, t, run.second["R"][t], prefix="eval_heldout")
    if run.best is None:  # under keep_best the curve ended before the best weights came back
        st.within_task[t].append(st.R[t][t])
    st.task, st.step_in_task = t + 1, 0
    _log_row(run, t, st.R[t], prefix="eval")
    record_rank_state(run)
    if cfg.continual_learning.save_checkpoint_per_task or t == run.T - 1:
        run.save(f"task_{t:02d}.ckpt")
    if cfg.continual_learning.export_per_task:
        from cl_vla.policies.export import export_task
        from cl_vla.training.fsdp import full_state_dict

        with run.algorithm.eval_context(t, run.module):  # the policy as task t is evaluated
            full = full_state_dict(run.policy)  # sharded: gathered by every rank, onto rank 0
            if run.trainer.is_global_zero:
                pre, post = run.module.preprocessor, run.module.postprocessor
                export_task(run.run_dir, t, run.policy, pre, post, state_dict=full)


def _log_row(run: ContinualRun, t: int, row: list[float | None], prefix: str) -> None:
    values = [np.nan if v is None else v for v in row]
    log_row(run.loggers, t, values, run.trainer.global_step, prefix=prefix)
