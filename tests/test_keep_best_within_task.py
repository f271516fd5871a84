"""eval.keep_best_within_task: LIBERO's learn_one_task protocol (each task ends with its best weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cl_vla.training.within_task import BestWithinTask
from conftest import compose_config, in_process_overrides

STEPS = 4  # per task: within-task points at steps 0 (zero-shot), 2 and 4 (the task's end)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.norm = nn.BatchNorm1d(2)  # running statistics: buffers that training changes


def _fill(net: nn.Module, value: float) -> None:
    with torch.no_grad():
        for t in net.state_dict(keep_vars=True).values():
            if t.dtype.is_floating_point:
                t.fill_(value)


def test_the_first_best_is_kept_and_only_what_trains_is_copied() -> None:
    net = _Net()
    best = BestWithinTask(higher_is_better=True)
    _fill(net, 1.0)
    assert best.offer(net, 0.4)
    _fill(net, 2.0)
    assert not best.offer(net, 0.4)  # a tie keeps the first, as LIBERO's strict `prev < success`
    assert best.offer(net, 0.6)
    _fill(net, 3.0)
    assert not best.offer(net, 0.5)
    assert set(best.weights) == {
        "trained.weight",
        "trained.bias",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }
    best.restore(net)
    assert torch.equal(net.trained.weight, torch.full((2, 2), 2.0))
    assert torch.equal(net.norm.running_mean, torch.full((2,), 2.0))
    assert torch.equal(net.frozen.weight, torch.full((2, 2), 3.0))  # frozen: never copied, never changed

    again = BestWithinTask(higher_is_better=True)
    again.load_state_dict(best.state_dict())
    assert again.best == 0.6 and not again.is_better(0.6) and again.is_better(0.61)
    losses = BestWithinTask(higher_is_better=False)  # held-out loss: lower is better
    assert losses.offer(net, 0.5) and not losses.offer(net, 0.7) and losses.offer(net, 0.2)
    losses.clear()
    assert losses.state_dict() == {} and losses.is_better(9.0)
    with pytest.raises(RuntimeError, match="nothing to restore"):
        losses.restore(net)


def test_keep_best_needs_within_task_evaluations() -> None:
    from cl_vla.cli import validate_config
    from cl_vla.errors import ConfigError

    cfg = compose_config("eval.keep_best_within_task=true")
    with pytest.raises(ConfigError, match=r"needs eval.within_task_evals > 0"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match=r"eval.within_task_evals=-1 is not allowed"):
        validate_config(compose_config("eval.within_task_evals=-1"))


class Crash(RuntimeError):
    """Stands for a killed process, after the mid-task checkpoint at step 2 of the second task."""


def _hook(weights_at: dict, at_task_end: list, crash: bool):
    """Records the trainable weights at every evaluation (first one per (task, step)) and at each
    on_task_end; with ``crash``, raises at step 3 of the second task."""

    def trainable(module: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def instrument(algorithm) -> None:
        eval_context, on_task_end, observe = algorithm.eval_context, algorithm.on_task_end, algorithm.observe

        def recording_eval_context(task, module):
            weights_at.setdefault((module.task, module.step_in_task()), trainable(module))
            return eval_context(task, module)

        def recording_on_task_end(task, ctx):
            at_task_end.append(trainable(ctx.module))
            return on_task_end(task, ctx)

        def crashing_observe(batch, **kwargs):
            observe(batch, **kwargs)
            module = kwargs["module"]
            if crash and module.task == 1 and module.step_in_task() == 3:
                raise Crash("crash at task 1, step 3")

        algorithm.eval_context = recording_eval_context
        algorithm.on_task_end = recording_on_task_end
        algorithm.observe = crashing_observe

    return instrument


def _final(run_dir: Path) -> tuple[np.ndarray, dict, list]:
    R = np.array(json.loads((run_dir / "results.json").read_text())["matrix"], dtype=float)
    ckpt = torch.load(run_dir / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)
    return R, ckpt["state_dict"], json.loads(ckpt["cl_vla"]["state"])["within_task"]


@pytest.mark.slow
def test_each_task_ends_with_its_best_weights_and_a_resume_is_exact(synthetic_libero, tmp_path: Path) -> None:
    from cl_vla.training.in_process import run_in_process

    root, repo_id, _ = synthetic_libero
    overrides = [
        *in_process_overrides("sequential", root, repo_id, "best2", STEPS),
        "eval.within_task_evals=1",
        "eval.keep_best_within_task=true",
        "trainer.checkpoint_every_n_steps=2",  # at step 2, where the within-task point is taken too
        "trainer.warmup_steps=1",
        "trainer.lr=0.3",  # a rate that overshoots, so that some task's best point is not its last
    ]
    weights_at: dict = {}
    at_task_end: list = []
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    results, _, _ = run_in_process(overrides, ref, algorithm_hook=_hook(weights_at, at_task_end, crash=False))
    R, weights, curves = _final(ref)
    restored_earlier = 0
    for t, curve in enumerate(curves):
        assert len(curve) == 3  # zero-shot, step 2, the task's last step
        b = int(np.argmin(curve))  # held-out loss: the best is the lowest, the first of equal ones
        restored_earlier += b < len(curve) - 1
        kept = weights_at[(t, [0, 2, STEPS][b])]
        for name, value in kept.items():  # on_task_end sees the weights of the best point
            torch.testing.assert_close(at_task_end[t][name], value, rtol=0, atol=0, msg=name)
        # sequential's on_task_end changes nothing: the row's own evaluation gives the best point again.
        assert R[t, t] == pytest.approx(curve[b], abs=1e-6)
    assert restored_earlier >= 1, "no task peaked before its end: the test no longer checks a restore"
    m = results["metrics"]
    assert m["libero_nbt_code"] is not None and m["libero_fwt_code"] is not None

    with pytest.raises(Crash):
        run_in_process(overrides, cut, algorithm_hook=_hook({}, [], crash=True))
    state = json.loads((cut / "checkpoints" / "state.json").read_text())
    assert (state["task"], state["step_in_task"], len(state["within_task"][1])) == (1, 2, 2)
    run_in_process([*overrides, f"resume={cut}"], tmp_path / "unused_resume_out")
    R_cut, weights_cut, curves_cut = _final(cut)
    np.testing.assert_allclose(R_cut, R, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(curves_cut), np.array(curves), rtol=0, atol=1e-6)
    for name, value in weights.items():
        torch.testing.assert_close(weights_cut[name], value, rtol=0, atol=1e-6, msg=name)
