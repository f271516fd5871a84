"""SI: the path integral on a quadratic loss with known gradients, the penalty, exact state, bad values.

The hooks are driven in the loop's order (penalty -> backward -> after_backward -> [clip] -> optimizer
step -> observe) on a float64 quadratic "policy" behind a minimal stand-in for the LightningModule;
one short run goes through ``train.py`` end to end.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from cl_vla.algorithms.base import TaskContext
from cl_vla.algorithms.si import SI
from conftest import two_task_run

A = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64)  # curvature per coordinate


class QuadPolicy(nn.Module):
    """loss = 1/2 sum_i a_i (w_i - target_i)^2, so d loss / d w = a * (w - target)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        self.unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # never gets a gradient

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return 0.5 * (A * (self.w - batch["target"]).square()).sum(), {}


class FakeModule:
    def __init__(self) -> None:
        self.policy = QuadPolicy()

    def compute_loss(self, raw: dict) -> tuple[torch.Tensor, dict]:
        return self.policy(dict(raw))


def ctx(module: FakeModule, task: int) -> TaskContext:
    return TaskContext(task_id=task, task_name=f"t{task}", num_tasks=2, module=module)


def train(
    algo: SI, module: FakeModule, target: torch.Tensor, steps: int, lr: float = 0.1, clip: float | None = None
) -> torch.Tensor:
    """Run ``steps`` SGD steps through the hooks; returns the hand-computed path integral of the task loss."""
    opt = torch.optim.SGD(module.policy.parameters(), lr=lr)
    batch = {"target": target}
    omega = torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):
        w_before = module.policy.w.detach().clone()
        loss, _ = module.compute_loss(batch)
        pen = algo.penalty(module, batch, {})
        opt.zero_grad()
        (loss if pen is None else loss + pen).backward()
        algo.after_backward(module, batch)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(module.policy.parameters(), clip)
        opt.step()
        algo.observe(batch, module=module, outputs=None)
        task_grad = A * (w_before - target)  # known: the task loss's gradient, before clipping
        omega += -task_grad * (module.policy.w.detach() - w_before)
    return omega


def test_importance_equals_hand_computed_path_integral() -> None:
    module, algo = FakeModule(), SI(si_c=0.5, xi=0.01)
    t0, t1 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 1.0, 0.0]).double()

    start0 = module.policy.w.detach().clone()
    omega0 = train(algo, module, t0, steps=6, clip=0.5)  # clipping changes delta, not g
    torch.testing.assert_close(algo.path_integral()["w"], omega0, rtol=1e-12, atol=0)
    assert (omega0 > 0).all()
    algo.on_task_end(0, ctx(module, 0))
    end0 = module.policy.w.detach().clone()
    big0 = torch.clamp(omega0 / ((end0 - start0).square() + 0.01), min=0)
    torch.testing.assert_close(algo.sample(0)["w"], big0, rtol=1e-12, atol=0)
    torch.testing.assert_close(algo.sample(0)["unused"], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(algo.anchor()["w"], end0, rtol=0, atol=0)
    assert algo.path_integral() == {}

    # Task 1 trains with the penalty on: omega still integrates the task loss's gradient only.
    omega1 = train(algo, module, t1, steps=5)
    torch.testing.assert_close(algo.path_integral()["w"], omega1, rtol=1e-12, atol=1e-15)
    algo.on_task_end(1, ctx(module, 1))
    end1 = module.policy.w.detach()
    big1 = torch.clamp(big0 + omega1 / ((end1 - end0).square() + 0.01), min=0)
    torch.testing.assert_close(algo.sample(0)["w"], big1, rtol=1e-12, atol=0)
    assert algo.tasks_consolidated == [0, 1]


def test_the_penalty_forwards_term_reused_after_backward_gives_the_same_bits() -> None:
    """after_backward takes Omega (theta - theta*) from the penalty's forward when it ran this step;
    recomputing it instead (no penalty this step) gives a bit-identical path integral."""
    t0, t1 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 1.0, 0.0]).double()
    runs = []
    for reuse in (True, False):
        module, algo = FakeModule(), SI(si_c=0.5, xi=0.01)
        train(algo, module, t0, steps=4)
        algo.on_task_end(0, ctx(module, 0))
        if not reuse:
            penalty = algo.penalty

            def penalty_without_reuse(*args, _penalty=penalty, _algo=algo):
                out = _penalty(*args)
                assert _algo._weighted is not None  # the fused path kept it...
                _algo._weighted = None  # ...and after_backward must recompute it
                return out

            algo.penalty = penalty_without_reuse
        train(algo, module, t1, steps=5)
        runs.append(algo.path_integral()["w"])
    assert torch.equal(runs[0], runs[1])


def test_penalty_zero_at_anchor_and_hand_formula_elsewhere() -> None:
    module, algo = FakeModule(), SI(si_c=2.0)
    assert algo.penalty(module, {}, {}) is None
    train(algo, module, torch.ones(3, dtype=torch.float64), steps=4)
    algo.on_task_end(0, ctx(module, 0))
    pen = algo.penalty(module, {}, {})
    assert float(pen.detach()) == 0.0 and pen.dtype == torch.float64
    with torch.no_grad():
        module.policy.w.add_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    omega, anchor = algo.sample(0), algo.anchor()
    expected = 2.0 * (omega["w"] * (module.policy.w - anchor["w"]).square()).sum()
    torch.testing.assert_close(algo.penalty(module, {}, {}), expected)


def test_state_round_trip_mid_task_resumes_exactly() -> None:
    target0, target1 = torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 2.0, -1.0]).double()
    module, algo = FakeModule(), SI(si_c=0.3, xi=0.05)
    train(algo, module, target0, steps=3)
    algo.on_task_end(0, ctx(module, 0))
    train(algo, module, target1, steps=2)  # mid-task: omega and the task start are live state

    buf = io.BytesIO()
    torch.save(algo.state_dict(), buf)
    buf.seek(0)
    restored, module2 = SI(), FakeModule()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    module2.policy.load_state_dict(module.policy.state_dict())
    assert (restored.si_c, restored.xi) == (algo.si_c, algo.xi)
    for a, b in ((algo, module), (restored, module2)):
        train(a, b, target1, steps=3)
        a.on_task_end(1, ctx(b, 1))
    for name, value in algo.sample(0).items():
        assert torch.equal(restored.sample(0)[name], value)
    assert torch.equal(restored.anchor()["w"], algo.anchor()["w"])
    assert restored.tasks_consolidated == algo.tasks_consolidated == [0, 1]
    with pytest.raises(ValueError, match="ewc"):
        restored.load_state_dict({**algo.state_dict(), "name": "ewc"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"si_c": -0.1}, "si_c must be a finite number >= 0, got -0.1"),
        ({"si_c": float("inf")}, "si_c"),
        ({"xi": 0.0}, "xi must be a finite number > 0, got 0.0"),
        ({"xi": -1e-3}, "xi"),
        ({"xi": "small"}, "xi"),
    ],
)
def test_bad_values_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SI(**kwargs)


@pytest.mark.slow
def test_si_end_to_end(synthetic_libero, tmp_path) -> None:
    _, ckpt = two_task_run("si", synthetic_libero, tmp_path / "run")
    state = ckpt["cl_vla"]["algorithm"]
    assert state["tasks_consolidated"] == [0, 1] and state["omega"] == {}
    omegas = list(state["big_omega"].values())
    assert omegas and all(torch.isfinite(o).all() and (o >= 0).all() for o in omegas)
    assert any(o.sum() > 0 for o in omegas)
