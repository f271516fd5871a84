"""End-to-end runs of train.py: the whole sequence, W&B offline, checkpoints, resume after SIGKILL."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from cl_vla.training.in_process import run_in_process
from conftest import REPO_ROOT, TEST_ENV, last_line, run_train, synthetic_overrides

pytestmark = pytest.mark.slow

FAST = [
    "trainer.progress_bar=false",
    "data.num_workers=0",
    "data.batch_size=8",
    "model.image_size=16",
    "trainer.warmup_steps=2",
]


def test_er_libero_spatial_end_to_end(synthetic_libero, tmp_path):
    root, repo_id, _ = synthetic_libero
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            "algorithm=er",
            "task_sequence=libero_spatial",
            *synthetic_overrides(root, repo_id),
            *FAST,
            "continual_learning.steps_per_task=3",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((run_dir / "results.json").read_text())
    R = np.array(results["matrix"], dtype=float)
    assert R.shape == (10, 10) and np.isfinite(R).all()
    assert results["metrics"]["bwt"] is not None and results["metrics"]["acc"] is not None
    assert (run_dir / "r_matrix.png").stat().st_size > 1000
    assert len((run_dir / "r_matrix.csv").read_text().splitlines()) == 11
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("task_*.ckpt")) == [
        f"task_{i:02d}.ckpt" for i in range(10)
    ]
    assert "ACC" in proc.stdout and "BWT" in proc.stdout

    from cl_vla.tracking.wandb_offline import read_offline_run

    (wb,) = list((run_dir / "wandb").glob("offline-run-*"))
    run = read_offline_run(wb)
    assert run["summary"]["cl/acc"] == pytest.approx(results["metrics"]["acc"])
    assert run["summary"]["cl/bwt"] == pytest.approx(results["metrics"]["bwt"])
    assert run["summary"]["cl/R_matrix/_type"] == "table-file"
    rows = [h for h in run["history"] if "eval/after_task" in h]
    assert [int(h["eval/after_task"]) for h in rows] == list(range(10))  # one R row logged per task
    assert rows[3]["eval/task_07"] == pytest.approx(R[3, 7])
    tables = list(wb.glob("files/media/table/cl/R_matrix*.table.json"))
    table = json.loads(tables[0].read_text())
    assert np.allclose(np.array([r[1:] for r in table["data"]], dtype=float), R)


def _small_args(root, repo_id, extra=()):
    return [
        "algorithm=er",
        "algorithm.buffer_size_per_task=6",
        "task_sequence=custom",
        "task_sequence.name=resume3",
        "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in _three_tasks()) + "]",
        *synthetic_overrides(root, repo_id),
        *FAST,
        "continual_learning.steps_per_task=24",
        "trainer.checkpoint_every_n_steps=4",
        "trainer.deterministic=true",
        "logger=none",
        *extra,
    ]


def _three_tasks():
    from cl_vla.data.task_sequences import get_task_sequence

    return list(get_task_sequence("libero_spatial").tasks[:3])


def _as_written_before_lambda_lr(ckpt_path: Path, steps_per_task: int) -> None:
    """Rewrite a mid-task checkpoint as cl_vla wrote it before the LambdaLR: no scheduler state, and
    the optimizer's rate the one set by hand before the last completed step."""
    from cl_vla.training.checkpointing import write_checkpoint
    from cl_vla.training.module import CLPolicyModule

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    done = ckpt["global_step"] % steps_per_task
    warmup = int(next(a.split("=")[1] for a in FAST if a.startswith("trainer.warmup_steps=")))
    probe = type("P", (), {"warmup_steps": warmup, "steps_per_task": steps_per_task, "min_lr_ratio": 0.1})()
    ckpt["lr_schedulers"] = []
    for group in ckpt["optimizer_states"][0]["param_groups"]:
        group["lr"] = group.pop("initial_lr") * CLPolicyModule.lr_factor(probe, done - 1)
    write_checkpoint(ckpt, ckpt_path)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "task_02.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def _resume_in_process(root, repo_id, run_dir: Path, out_dir: Path, extra=()) -> str:
    """Resume ``run_dir`` as ``train.py resume=<run_dir>`` would, in this process; returns what it printed."""
    console = Console(record=True, file=io.StringIO(), width=200)
    run_in_process(_small_args(root, repo_id, [f"resume={run_dir}", *extra]), out_dir, console=console)
    return console.export_text()


#: The killed run and its resume log to CSV and (offline) W&B; the reference run to CSV only. A row is
#: logged every 4 steps, on the checkpoint steps themselves (the case where a row follows its checkpoint).
LOGGED = ["logger=default", "trainer.log_every_n_steps=4"]


def _wait_for_row(run_dir: Path, step: int, proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("step", "").isdigit() and int(r["step"]) >= step for r in _csv_rows(run_dir)):
            return
        time.sleep(0.005)


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_log(cut: list[dict[str, str]], ref: list[dict[str, str]]) -> None:
    """The resumed run's CSV holds the uninterrupted run's rows: same steps, same metrics, same values."""
    assert [r["step"] for r in cut] == [r["step"] for r in ref]
    for a, b in zip(cut, ref, strict=True):
        assert {k for k, v in a.items() if v} == {k for k, v in b.items() if v}, (a, b)
        for k, v in b.items():
            if v:
                assert float(a[k]) == pytest.approx(float(v), abs=1e-5), (k, a, b)


def test_sigkill_mid_task_then_resume_matches_uninterrupted(synthetic_libero, tmp_path):
    # Only the killed run needs its own process; the others run in this one (no interpreter start-up).
    root, repo_id, _ = synthetic_libero
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run_in_process(_small_args(root, repo_id, [*LOGGED, "logger.wandb.enabled=false"]), ref_dir)

    # Start the same run and SIGKILL it once it has written a mid-task checkpoint of the second task.
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        *_small_args(root, repo_id, LOGGED),
        f"hydra.run.dir={cut_dir}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env={**os.environ, **TEST_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_file = cut_dir / "checkpoints" / "state.json"
    deadline = time.time() + 500
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        if state and state["checkpoint"] == "last.ckpt" and state["task"] == 1 and state["step_in_task"] >= 8:
            # Lightning logs the checkpoint step's row just after the checkpoint: let it reach the CSV
            # file (a kill in that instant would lose that one row; the uninterrupted run has it).
            _wait_for_row(cut_dir, 24 + state["step_in_task"] - 1, proc)
            proc.send_signal(signal.SIGKILL)
            killed_at = (state["task"], state["step_in_task"])
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run ended before a mid-task checkpoint of task 1 appeared"
    assert not (cut_dir / "results.json").exists()
    legacy_dir = tmp_path / "legacy"
    shutil.copytree(cut_dir, legacy_dir)
    _as_written_before_lambda_lr(legacy_dir / "checkpoints" / "last.ckpt", steps_per_task=24)
    before = _csv_rows(cut_dir)
    assert before and int(before[-1]["step"]) >= 24 + 8 - 1  # task 0's rows and task 1's first ones

    printed = _resume_in_process(root, repo_id, cut_dir, tmp_path / "resume_out", LOGGED)
    assert "resuming" in printed and "at task 2/3" in printed, printed[-2000:]

    # One continuous CSV log, row for row the uninterrupted run's, and one W&B run, resumed by its id.
    _assert_same_log(_csv_rows(cut_dir), _csv_rows(ref_dir))
    wandb_id = json.loads((cut_dir / "run.json").read_text())["wandb_id"]
    runs = sorted((cut_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(wandb_id in r.name for r in runs), runs

    r_ref = json.loads((ref_dir / "results.json").read_text())["matrix"]
    r_cut = json.loads((cut_dir / "results.json").read_text())["matrix"]
    np.testing.assert_allclose(np.array(r_cut, float), np.array(r_ref, float), rtol=0, atol=1e-6)
    w_ref, w_cut = _final_weights(ref_dir), _final_weights(cut_dir)
    assert w_ref.keys() == w_cut.keys()
    for k in w_ref:
        torch.testing.assert_close(w_cut[k], w_ref[k], rtol=0, atol=1e-6, msg=k)

    # A mid-task checkpoint from before the schedule was a LambdaLR resumes to the same end too.
    assert "resuming" in _resume_in_process(root, repo_id, legacy_dir, tmp_path / "legacy_out")
    r_legacy = json.loads((legacy_dir / "results.json").read_text())["matrix"]
    np.testing.assert_allclose(np.array(r_legacy, float), np.array(r_ref, float), rtol=0, atol=1e-6)
    w_legacy = _final_weights(legacy_dir)
    for k in w_ref:
        torch.testing.assert_close(w_legacy[k], w_ref[k], rtol=0, atol=1e-6, msg=k)
    # Resuming from a task-boundary checkpoint: tests/test_every_algorithm.py (every algorithm).


# Refused resumes (changed settings, damaged checkpoints, busy run folders): tests/test_run_integrity.py
# and tests/test_resume_fingerprint.py.


def test_nan_loss_stops_with_one_sentence_and_keeps_checkpoints(synthetic_libero, tmp_path):
    root, repo_id, _ = synthetic_libero
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            *_small_args(root, repo_id, ["trainer.lr=1e30", "trainer.grad_clip_norm=null"]),
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert proc.returncode != 0
    assert "loss became" in last_line(proc.stderr) and "Traceback" not in proc.stderr
    state_file = run_dir / "checkpoints" / "state.json"
    if state_file.exists():  # whatever was saved before the NaN is loadable
        state = json.loads(state_file.read_text())
        torch.load(run_dir / "checkpoints" / state["checkpoint"], map_location="cpu", weights_only=True)
    assert not (run_dir / "results.json").exists()
