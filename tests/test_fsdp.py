"""FSDP2 (``trainer=fsdp_cpu``: two CPU processes, gloo) against DDP (``trainer=ddp_cpu``), same seed.

Each algorithm whose state is sharded runs twice in one process group (started once: process start-up
is most of the cost), once per strategy, each into its own run directory. R and the final weights must
agree within a tolerance set by reduction order only: DDP all-reduces whole gradients and sums penalties
over whole tensors, FSDP reduce-scatters and sums each shard before one all-reduce, and EWC's per-sample
gradients come from ``vmap`` under DDP and from one backward per sample under FSDP. Each is a float32
re-association (relative error ~1e-7 a step), grown over the run's few steps to at most ~1e-5.

Also: every rank holds 1/N of each per-parameter tensor while training (a shard, never a full copy).
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import TEST_ENV, free_port, in_process_overrides, join_ranks

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

#: The algorithms that run under FSDP; the others are refused in one sentence (tests/test_config.py).
# ER and multitask share sequential's path (references only), online EWC separate EWC's: left out for time.
SHARDED = ["sequential", "derpp", "agem", "gem", "mir", "ewc", "si", "lwf"]
TRAINERS = ("ddp_cpu", "fsdp_cpu")
TIMEOUT_S = 900
RTOL, ATOL = 1e-4, 1e-5


def _join(rank: int, port: int) -> None:
    """This spawned process as rank ``rank`` of a 2-process group Lightning joins instead of launching."""
    os.environ.update(
        TEST_ENV,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE="2",
    )


def _rank(rank: int, port: int, root: str, repo_id: str, out: str) -> None:
    _join(rank, port)
    from rich.console import Console

    from cl_vla.algorithms.sharded import is_dtensor
    from cl_vla.training.in_process import compose_run
    from cl_vla.training.loop import run_continual

    for algo in SHARDED:
        for trainer in TRAINERS:
            run_dir = Path(out) / trainer / algo
            try:
                overrides = [
                    *in_process_overrides(algo, root, repo_id, "fsdp2", steps=3),
                    f"trainer={trainer}",
                    "trainer.warmup_steps=1",
                    # One algorithm covers the export gathered onto rank 0 (checked below).
                    f"continual_learning.export_per_task={algo == 'sequential'}",
                ]
                cfg, algorithm, data, policy_cfg = compose_run(overrides, run_dir)
                run_continual(cfg, data, policy_cfg, algorithm, console=Console(quiet=True))
                if trainer == "fsdp_cpu":
                    _record_shards(algorithm, run_dir, rank, is_dtensor)
            except Exception:
                (Path(out) / f"error_{trainer}_{algo}_rank{rank}.txt").write_text(traceback.format_exc())
                raise


def _record_shards(algorithm, run_dir: Path, rank: int, is_dtensor) -> None:
    """Each per-parameter tensor the algorithm holds: whether a shard, its local and global sizes."""
    held = {}
    teacher = getattr(algorithm, "_sharded", None)  # LwF's teacher, as shards of the student
    if teacher is not None:
        for name, t in teacher.params.items():
            held[f"teacher/{name}"] = [
                is_dtensor(t),
                t.to_local().numel() if is_dtensor(t) else t.numel(),
                t.numel(),
            ]
    for store in ("_importance", "_anchor", "_big_omega", "_omega"):
        value = getattr(algorithm, store, None)
        if not isinstance(value, dict):
            continue
        items = (
            value.items()
            if not value or not isinstance(next(iter(value.values())), dict)
            else ((f"{t}/{n}", x) for t, d in value.items() for n, x in d.items())
        )
        for name, t in items:
            held[f"{store}/{name}"] = [
                is_dtensor(t),
                t.to_local().numel() if is_dtensor(t) else t.numel(),
                t.numel(),
            ]
    (run_dir / f"shards_rank{rank}.json").write_text(json.dumps(held))


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=False)
    return {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()}


def test_fsdp_matches_ddp_and_shards_the_state(synthetic_libero, tmp_path: Path) -> None:
    root, repo_id, _ = synthetic_libero
    _spawn(_rank, tmp_path, str(root), repo_id, str(tmp_path))

    for algo in SHARDED:
        runs = {t: tmp_path / t / algo for t in TRAINERS}
        R = {
            t: np.array(json.loads((d / "results.json").read_text())["matrix"], float)
            for t, d in runs.items()
        }
        assert np.isfinite(R["fsdp_cpu"]).all(), algo
        np.testing.assert_allclose(R["fsdp_cpu"], R["ddp_cpu"], rtol=RTOL, atol=ATOL, err_msg=algo)
        ddp, fsdp = (_final_weights(runs[t]) for t in TRAINERS)
        assert ddp.keys() == fsdp.keys(), algo
        for k in ddp:
            torch.testing.assert_close(
                fsdp[k], ddp[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k, a=algo: f"{a} {k}: {m}"
            )
        if algo == "sequential":
            from safetensors.torch import load_file

            exported = load_file(runs["fsdp_cpu"] / "export" / "task_01" / "model.safetensors")
            for k, v in exported.items():
                torch.testing.assert_close(v, fsdp[k], rtol=0, atol=0, msg=k)
        shards = [json.loads((runs["fsdp_cpu"] / f"shards_rank{r}.json").read_text()) for r in (0, 1)]
        assert shards[0].keys() == shards[1].keys(), algo
        for name, (is_shard, local, full) in shards[0].items():
            other = shards[1][name][1]
            assert is_shard and local + other == full, (
                f"{algo}: {name} is not split over the ranks ({local}+{other} of {full})"
            )
        if algo in ("ewc", "ewc_online", "si", "lwf"):
            assert shards[0], f"{algo} holds no per-parameter state after two tasks"


def _kill_overrides(root: str, repo_id: str) -> list[str]:
    """EWC under FSDP with a checkpoint every 2 steps: the run the kill test cuts, and its reference."""
    return [
        *in_process_overrides("ewc", root, repo_id, "fsdp_kill2", steps=8),
        "trainer=fsdp_cpu",
        "trainer.warmup_steps=2",
        "algorithm.fisher_samples=8",
        "continual_learning.export_per_task=false",
        "trainer.checkpoint_every_n_steps=2",
    ]


def _kill_rank(rank: int, port: int, root: str, repo_id: str, out: str, resume: str | None) -> None:
    """One uninterrupted run (``resume=None``), or the resume of a cut one, in this spawned rank."""
    _join(rank, port)
    from cl_vla.training.in_process import run_in_process

    extra = [f"resume={resume}"] if resume else []
    try:
        run_in_process([*_kill_overrides(root, repo_id), *extra], Path(out))
    except Exception:
        (Path(out).parent / f"error_kill_rank{rank}.txt").write_text(traceback.format_exc())
        raise


def _spawn(target, tmp_path: Path, *args) -> None:
    ctx = mp.start_processes(target, args=(free_port(), *args), nprocs=2, join=False, start_method="spawn")
    join_ranks(ctx, tmp_path, TIMEOUT_S)


def test_sigkill_mid_task_under_fsdp_resumes_exactly(synthetic_libero, tmp_path: Path) -> None:
    """Both FSDP ranks killed (SIGKILL) mid-task, then ``resume=``: the same R and final weights as the
    uninterrupted run, bit for bit; a resume on another world size is refused in one sentence."""
    from cl_vla.config.fingerprint import ResumeMismatch
    from cl_vla.training.in_process import run_in_process

    root, repo_id, _ = synthetic_libero
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    _spawn(_kill_rank, tmp_path, str(root), repo_id, str(ref_dir), None)

    ctx = mp.start_processes(
        _kill_rank,
        args=(free_port(), str(root), repo_id, str(cut_dir), None),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    state_file = cut_dir / "checkpoints" / "state.json"
    deadline, killed_at = time.time() + TIMEOUT_S, None
    try:
        while time.time() < deadline and all(p.is_alive() for p in ctx.processes):
            try:
                state = json.loads(state_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                state = None
            if (
                state
                and state["checkpoint"] == "last.ckpt"
                and state["task"] == 1
                and state["step_in_task"] >= 4
            ):
                for p in ctx.processes:
                    os.kill(p.pid, signal.SIGKILL)
                killed_at = (state["task"], state["step_in_task"])
                break
            time.sleep(0.02)
    finally:
        for p in ctx.processes:
            p.join(timeout=30)
    assert killed_at is not None, "the run ended before a mid-task checkpoint of task 1 appeared"
    assert not (cut_dir / "results.json").exists()

    with pytest.raises(ResumeMismatch, match=r"trainer\.devices") as refused:
        overrides = [*_kill_overrides(str(root), repo_id), "trainer.devices=1", f"resume={cut_dir}"]
        run_in_process(overrides, tmp_path / "other")
    assert "\n" not in str(refused.value)

    _spawn(_kill_rank, tmp_path, str(root), repo_id, str(tmp_path / "resumed"), str(cut_dir))
    R = [np.array(json.loads((d / "results.json").read_text())["matrix"], float) for d in (ref_dir, cut_dir)]
    np.testing.assert_array_equal(R[1], R[0])
    w_ref, w_cut = (
        torch.load(d / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        for d in (ref_dir, cut_dir)
    )
    assert w_ref.keys() == w_cut.keys()
    for k in w_ref:
        torch.testing.assert_close(w_cut[k], w_ref[k], rtol=0, atol=0, msg=k)
