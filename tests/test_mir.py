"""MIR: the most interfered candidates are retrieved (a linear case solved by hand, and a nonlinear net
against an explicit virtual SGD step), their loss gradient is added, weights and the RNG stream are left
alone, candidates are a pure function of the step, exact state, bad values; one short run.
"""

from __future__ import annotations

import copy
import io
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from cl_vla.algorithms.mir import MIR, interference_scores, per_sample_losses, select_top
from conftest import two_task_run

# ---------------------------------------------------------------------------------------- harness


class LinearPolicy(nn.Module):
    """``y ~ w . x`` with squared error; ``forward(batch, reduction)`` like lerobot policies."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, batch: dict, reduction: str = "mean"):
        err = (batch["x"] @ self.w - batch["y"]).square()
        return (err if reduction == "none" else err.mean()), {}


class MeanOnlyPolicy(LinearPolicy):
    """A policy whose forward has no per-sample reduction."""

    def forward(self, batch: dict):  # type: ignore[override]
        return super().forward(batch)


class MLPPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def forward(self, batch: dict, reduction: str = "mean"):
        err = (self.net(batch["x"]) - batch["y"]).square().mean(-1)
        return (err if reduction == "none" else err.mean()), {}


def items(xs: list[list[float]], ys: list, offset: int = 0) -> list[dict]:
    return [
        {
            "x": torch.tensor(x, dtype=torch.float64),
            "y": torch.tensor(y, dtype=torch.float64),
            "index": offset + i,
        }
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    ]


# Memory for w = 0 after a current batch (x=[1, 0], y=1) whose gradient is -2 e1. The virtual step moves
# w to 2*lr*e1, so candidate (x, y) scores 4 lr^2 x1^2 - 4 lr x1 y: conflicting targets (y < 0) rise,
# aligned ones (y > 0) fall, orthogonal ones (x1 = 0) stay.
MEMORY_X = [[0.5, 0], [1, 0], [0, 1], [2, 0], [1, 0], [0, 3], [2, 0]]
MEMORY_Y = [-1.0, 1.0, 1.0, -1.0, -1.0, -2.0, 1.0]
LR = 0.1


def analytic_scores() -> list[float]:
    return [4 * LR**2 * x[0] ** 2 - 4 * LR * x[0] * y for x, y in zip(MEMORY_X, MEMORY_Y, strict=True)]


def linear_setup(**kwargs) -> tuple[MIR, SimpleNamespace]:
    policy = LinearPolicy()
    policy.forward(default_collate(items([[1, 0]], [1.0])))[0].backward()
    assert policy.w.grad.tolist() == [-2.0, 0.0]
    algo = MIR(**{"mir_candidates": 7, "k": 3, "virtual_lr": LR, "buffer_size_per_task": 10, **kwargs})
    algo.populate_from_dataset(0, items(MEMORY_X, MEMORY_Y))
    return algo, SimpleNamespace(policy=policy, global_step=4, task=1, global_rank=0)


# ------------------------------------------------------------------------------------------- math


def test_scores_are_the_loss_increase_under_the_virtual_step() -> None:
    policy = LinearPolicy()
    policy.w.grad = torch.tensor([-2.0, 0.0], dtype=torch.float64)
    batch = default_collate(items(MEMORY_X, MEMORY_Y))
    scores = interference_scores(policy, batch, dict(policy.named_parameters()), LR)
    torch.testing.assert_close(scores, torch.tensor(analytic_scores(), dtype=torch.float64))
    assert select_top(scores, 3) == [3, 4, 0]  # the conflicting samples, most interfered first


def test_after_backward_retrieves_the_most_interfered_and_adds_their_gradient() -> None:
    algo, module = linear_setup()
    rng_before = torch.get_rng_state()
    algo.after_backward(module, {})
    assert algo.last_retrieved == [3, 4, 0]
    expected = sorted(analytic_scores(), reverse=True)[:3]
    torch.testing.assert_close(algo.last_scores, torch.tensor(expected, dtype=torch.float64))
    # Added: the gradient of the retrieved samples' mean loss at w = 0, i.e. mean(-2 y x) = [7/3, 0].
    torch.testing.assert_close(module.policy.w.grad, torch.tensor([-2 + 7 / 3, 0.0], dtype=torch.float64))
    assert module.policy.w.detach().tolist() == [0.0, 0.0]  # the virtual step never touched the weights
    assert torch.equal(torch.get_rng_state(), rng_before)  # scoring ran on a forked RNG
    assert algo.last_replay_loss.item() == 1.0  # every retrieved target is -1 and w = 0


def test_scores_match_an_explicit_sgd_step_on_a_nonlinear_net() -> None:
    policy = MLPPolicy()
    g = torch.Generator().manual_seed(1)
    current = {"x": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    current["y"] = torch.randn(5, 2, generator=g, dtype=torch.float64)
    policy.forward(current)[0].backward()
    candidates = {"x": torch.randn(20, 3, generator=g, dtype=torch.float64)}
    candidates["y"] = torch.randn(20, 2, generator=g, dtype=torch.float64)
    lr = 0.3
    scores = interference_scores(policy, candidates, dict(policy.named_parameters()), lr)

    stepped = copy.deepcopy(policy)
    for p, q in zip(stepped.parameters(), policy.parameters(), strict=True):
        p.grad = q.grad.clone()  # deepcopy leaves .grad behind
    torch.optim.SGD(stepped.parameters(), lr=lr).step()
    with torch.no_grad():
        expected = stepped(candidates, "none")[0] - policy(candidates, "none")[0]
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    assert select_top(scores, 4) == torch.argsort(expected, descending=True)[:4].tolist()


def test_policies_without_per_sample_reduction_are_scored_one_sample_at_a_time() -> None:
    batch = default_collate(items(MEMORY_X, MEMORY_Y))
    with_reduction, mean_only = LinearPolicy(), MeanOnlyPolicy()
    with torch.no_grad():
        with_reduction.w.fill_(0.5)
        mean_only.w.fill_(0.5)
    torch.testing.assert_close(per_sample_losses(mean_only, batch), per_sample_losses(with_reduction, batch))


def test_learning_rate_defaults_to_the_optimizers() -> None:
    algo, module = linear_setup(virtual_lr=None)
    module.trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": LR}])])
    algo.after_backward(module, {})
    assert algo.last_retrieved == [3, 4, 0]
    algo, module = linear_setup(virtual_lr=None)
    with pytest.raises(ValueError, match="virtual_lr"):
        algo.after_backward(module, {})


def test_nothing_happens_without_memory_or_gradients() -> None:
    algo = MIR(mir_candidates=4, k=2, virtual_lr=LR, buffer_size_per_task=4)
    policy = LinearPolicy()
    policy.w.grad = torch.ones(2, dtype=torch.float64)
    algo.after_backward(SimpleNamespace(policy=policy), {})  # empty buffer
    assert policy.w.grad.tolist() == [1.0, 1.0] and algo.last_retrieved == []
    algo.populate_from_dataset(0, items(MEMORY_X[:4], MEMORY_Y[:4]))
    fresh = LinearPolicy()
    algo.after_backward(SimpleNamespace(policy=fresh), {})  # no gradient yet
    assert fresh.w.grad is None and algo.last_retrieved == []
    # No loss term and, by default, no random replay in the batch: all replay is MIR's retrieval.
    assert algo.penalty(None, {}, {}) is None and algo.replay_batch_ratio == 0.0


def test_candidates_are_a_pure_function_of_the_step() -> None:
    algo = MIR(mir_candidates=5, k=2, buffer_size_per_task=30, seed=3)
    algo.populate_from_dataset(0, items([[0.0, 0.0]] * 30, [0.0] * 30))
    pairs, noise = algo.candidate_pairs(1, 0, 7)
    assert (pairs, noise) == algo.candidate_pairs(1, 0, 7)
    assert len({r for _, r in pairs}) == 5  # distinct
    assert pairs != algo.candidate_pairs(1, 0, 8)[0] and pairs != algo.candidate_pairs(1, 1, 7)[0]
    small = MIR(mir_candidates=50, k=2, buffer_size_per_task=4)
    small.populate_from_dataset(0, items([[0.0, 0.0]] * 4, [0.0] * 4))
    assert sorted(r for _, r in small.candidate_pairs(1, 0, 0)[0]) == [0, 1, 2, 3]  # capped at the memory


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_round_trip_is_exact() -> None:
    algo, _ = linear_setup(virtual_lr=0.05, seed=11)
    state = _round_trip(algo.state_dict())
    json.dumps(state)  # plain values only
    restored = MIR()
    restored.load_state_dict(state)
    assert (restored.mir_candidates, restored.k, restored.virtual_lr, restored.seed) == (7, 3, 0.05, 11)
    assert restored.candidate_pairs(1, 0, 9) == algo.candidate_pairs(1, 0, 9)
    restored.attach_dataset(0, items(MEMORY_X, MEMORY_Y))
    # The seed's sample() still works after a restore and continues the same stream.
    assert [x["index"] for x in restored.sample(4)] == [x["index"] for x in algo.sample(4)]
    with pytest.raises(ValueError, match="mir_candidates"):
        MIR().load_state_dict({**state, "k": 8})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mir_candidates": 0}, "mir_candidates"),
        ({"k": 0}, "k must"),
        ({"mir_candidates": 5, "k": 6}, "k must"),
        ({"k": 10, "buffer_size_per_task": 4}, "buffer_size_per_task"),
        ({"virtual_lr": 0.0}, "virtual_lr"),
        ({"virtual_lr": -1e-3}, "virtual_lr"),
        ({"replay_batch_ratio": 1.0}, "replay_batch_ratio"),
    ],
)
def test_bad_hyperparameters_are_one_sentence(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        MIR(**kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_mir_end_to_end(synthetic_libero, tmp_path) -> None:
    extra = ("algorithm.buffer_size_per_task=8", "algorithm.mir_candidates=6", "algorithm.k=2")
    _, ckpt = two_task_run("mir", synthetic_libero, tmp_path / "run", *extra)
    state = ckpt["cl_vla"]["algorithm"]
    assert (state["mir_candidates"], state["k"]) == (6, 2) and sorted(state["tasks"]) == ["0", "1"]
