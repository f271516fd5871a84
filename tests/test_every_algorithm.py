"""Every shipped algorithm, through the loop alone: every hook is reached, and it resumes exactly.

For each ``conf/algorithm`` choice, with ``tiny_vla`` (here) and with the tiny twins of the hub VLAs
(``test_every_algorithm_twins.py``: lerobot's real VLA classes and processors, random weights), one
uninterrupted two-task run counts the hook calls (hook reachability); then a run that crashes
mid-task (after a mid-task checkpoint) and is resumed, and a run resumed from the first task-boundary
checkpoint, must both end with the same R matrix, weights and algorithm state as the uninterrupted
one: the checkpoint contract (algorithm state saved whole, nothing re-sampled or recomputed on
resume). One test per (model, algorithm), sharing the uninterrupted run, because the runs, not the
checks, are what costs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONF_DIR, in_process_overrides

pytestmark = pytest.mark.slow

ALGORITHMS = sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml"))
#: The hub-VLA twins (tests/test_every_algorithm_twins.py, a file of its own so pytest-xdist runs it
#: beside this one): SmolVLA with every algorithm, the others with those whose state differs most.
TWIN_SUBSET = ("er", "ewc", "gem", "packnet", "lora_per_task")
TWIN_CASES = [
    *(("smolvla_tiny", a) for a in ALGORITHMS),
    *((m, a) for m in ("pi0_tiny", "pi05_tiny", "groot_tiny") for a in TWIN_SUBSET),
]
HOOKS = (
    "setup",
    "on_task_start",
    "training_tasks",
    "replay_indices",
    "penalty",
    "after_backward",
    "observe",
    "on_task_end",
    "eval_context",
    "state_dict",
)
STEPS = 4  # per task; a mid-task checkpoint every 2 steps, so the crash at step 3 resumes from step 2
CRASH_STEP = 3


class Crash(RuntimeError):
    """Stands for a killed process: raised from inside Lightning's fit, after a checkpoint."""


def _counting(calls: Counter):
    def instrument(algorithm) -> None:
        for name in HOOKS:
            method = getattr(algorithm, name)

            @functools.wraps(method)
            def record(*args, _name=name, _method=method, **kwargs):
                calls[_name] += 1
                return _method(*args, **kwargs)

            setattr(algorithm, name, record)

    return instrument


def _crash_in_second_task(algorithm) -> None:
    inner = algorithm.observe

    def observe(batch, **kwargs):
        inner(batch, **kwargs)
        module = kwargs["module"]
        if module.task == 1 and module.step_in_task() == CRASH_STEP:
            raise Crash(f"crash at task 1, step {CRASH_STEP}")

    algorithm.observe = observe


def _overrides(algo: str, synthetic_libero, model: str = "tiny_vla") -> list[str]:
    root, repo_id, _ = synthetic_libero
    return [
        *in_process_overrides(algo, root, repo_id, "resume2", STEPS, model=model),
        "trainer.checkpoint_every_n_steps=2",
        "trainer.warmup_steps=2",
    ]


def _digest(state) -> str:
    from cl_vla.training.rank_digest import hash_into

    digest = hashlib.sha256()
    hash_into(digest, state)
    return digest.hexdigest()


def _final(run_dir: Path) -> tuple[np.ndarray, dict[str, torch.Tensor], str]:
    """R, weights and the algorithm-state digest of a finished run, read from its files."""
    R = np.array(json.loads((run_dir / "results.json").read_text())["matrix"], dtype=float)
    ckpt = torch.load(run_dir / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)
    return R, ckpt["state_dict"], _digest(ckpt["cl_vla"]["algorithm"])


def _assert_same_run(got: Path, ref: Path, what: str) -> None:
    r_got, w_got, a_got = _final(got)
    r_ref, w_ref, a_ref = _final(ref)
    np.testing.assert_allclose(r_got, r_ref, rtol=0, atol=1e-6, err_msg=f"{what}: R differs")
    assert w_got.keys() == w_ref.keys(), what
    for k in w_ref:
        torch.testing.assert_close(w_got[k], w_ref[k], rtol=0, atol=1e-6, msg=f"{what}: {k}")
    assert a_got == a_ref, f"{what}: the algorithm's state differs from the uninterrupted run's"


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_hook_is_reached_and_resume_is_exact(algo, synthetic_libero, tmp_path: Path):
    check_hooks_and_resume("tiny_vla", algo, synthetic_libero, tmp_path)


def check_hooks_and_resume(model: str, algo: str, synthetic_libero, tmp_path: Path) -> None:
    """Hook reachability, then exact resume mid-task and at the task boundary, for ``model`` x ``algo``."""
    from cl_vla.training.in_process import run_in_process

    overrides = _overrides(algo, synthetic_libero, model)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    calls: Counter = Counter()
    results, algorithm, _ = run_in_process(overrides, ref, algorithm_hook=_counting(calls))
    # replay_indices is asked only of algorithms that replay (replay_batch_ratio > 0).
    expected = [h for h in HOOKS if h != "replay_indices" or algorithm.replay_batch_ratio > 0]
    missing = [h for h in expected if calls[h] == 0]
    assert not missing, f"{algo}: hooks never reached: {missing}"
    assert calls["on_task_start"] == calls["on_task_end"] == 2
    assert calls["observe"] == calls["after_backward"] == calls["penalty"] == 2 * STEPS
    assert calls["eval_context"] >= 2 * 2  # every task evaluated after every task
    assert results["matrix"].shape == (2, 2) and np.isfinite(results["matrix"]).all()

    with pytest.raises(Crash):
        run_in_process(overrides, cut, algorithm_hook=_crash_in_second_task)
    state = json.loads((cut / "checkpoints" / "state.json").read_text())
    assert (state["checkpoint"], state["task"], state["step_in_task"]) == ("last.ckpt", 1, 2)
    assert not (cut / "results.json").exists()
    run_in_process([*overrides, f"resume={cut}"], tmp_path / "unused_resume_out")
    _assert_same_run(cut, ref, f"{algo}, resumed mid-task")

    boundary = tmp_path / "boundary"
    shutil.copytree(ref, boundary)
    (boundary / "results.json").unlink()
    run_in_process([*overrides, f"resume={boundary / 'checkpoints' / 'task_00.ckpt'}"], tmp_path / "unused2")
    _assert_same_run(boundary, ref, f"{algo}, resumed at the task boundary")
