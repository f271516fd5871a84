"""LwF: zero term for an identical student, the masked distance after it changes, gradients only into the
student, the teacher a true snapshot, exact state round trip, bad values; one short run through train.py.

The math uses a tiny float64 chunk policy behind a minimal stand-in for the LightningModule (``.policy``).
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_vla.algorithms.base import TaskContext
from cl_vla.algorithms.lwf import LwF, masked_distance
from conftest import two_task_run

CHUNK, ACT = 3, 2

# ---------------------------------------------------------------------------------------- harness


class ChunkPolicy(nn.Module):
    """``x (B, 4) -> action chunk (B, CHUNK, ACT)``; no dropout, so a copy gives identical outputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, CHUNK * ACT)
        self.register_buffer("scale", torch.tensor(1.5))
        self.double()

    def compute_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"action_pred": (self.lin(batch["x"]) * self.scale).view(-1, CHUNK, ACT)}

    def action_loss(self, pred, target, action_is_pad=None, reduction="mean"):
        valid = (
            torch.ones(pred.shape[:2], dtype=pred.dtype)
            if action_is_pad is None
            else (~action_is_pad).double()
        )
        err = (pred - target).square() * valid.unsqueeze(-1)
        per = err.sum(dim=(1, 2)) / (valid.sum(1) * ACT)
        return per if reduction == "none" else err.sum() / (valid.sum() * ACT)

    def forward(self, batch: dict, reduction: str = "mean"):
        loss = self.action_loss(
            self.compute_outputs(batch)["action_pred"], batch["action"], batch.get("action_is_pad"), reduction
        )
        return loss, {"loss": float(loss.detach().mean())}


def make_batch(n: int, seed: int = 1, pad_last: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(n, CHUNK, dtype=torch.bool)
    if pad_last:
        pad[0, -1] = True  # the first sample's episode ends before its chunk does
    return {
        "x": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "action": torch.randn(n, CHUNK, ACT, generator=g, dtype=torch.float64),
        "action_is_pad": pad,
        "index": torch.arange(n),
        "task": ["a"] * n,
    }


def fake_module(policy: nn.Module) -> SimpleNamespace:
    return SimpleNamespace(policy=policy)


def ctx(task: int, module) -> TaskContext:
    return TaskContext(task_id=task, task_name=str(task), num_tasks=3, module=module)


def trained_lwf(distill: str = "l2", alpha: float = 0.7) -> tuple[LwF, SimpleNamespace]:
    module = fake_module(ChunkPolicy())
    algo = LwF(alpha=alpha, distill=distill)
    algo.setup(module)
    algo.on_task_end(0, ctx(0, module))
    return algo, module


def perturb(policy: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ------------------------------------------------------------------------------------------- math


def test_no_term_before_a_teacher_and_zero_for_an_identical_student() -> None:
    module = fake_module(ChunkPolicy())
    algo = LwF()
    algo.setup(module)
    batch = make_batch(5)
    assert algo.penalty(module, batch, {}) is None and algo.sample(4) == {}
    algo.on_task_end(0, ctx(0, module))
    term = algo.penalty(module, batch, {"loss": 0.3})
    assert term is not None and term.item() == 0.0


@pytest.mark.parametrize("distill", ["l2", "l1"])
def test_term_is_the_masked_distance_once_the_student_changes(distill: str) -> None:
    algo, module = trained_lwf(distill, alpha=0.7)
    batch = make_batch(5)
    teacher = module.policy.compute_outputs(batch)["action_pred"].detach().clone()
    perturb(module.policy)
    student = module.policy.compute_outputs(batch)["action_pred"]
    diff = student - teacher
    err = diff.square() if distill == "l2" else diff.abs()
    valid = (~batch["action_is_pad"]).double()
    expected = 0.7 * ((err * valid[..., None]).sum((1, 2)) / (valid.sum(1) * ACT)).mean()
    term = algo.penalty(module, batch, {})
    assert term.item() > 0
    torch.testing.assert_close(term, expected, rtol=1e-12, atol=0)
    # The teacher is a snapshot: changing the student did not move it.
    torch.testing.assert_close(algo.sample(1)["action_pred"], teacher, rtol=0, atol=0)


def test_padded_steps_do_not_count() -> None:
    student = torch.zeros(2, CHUNK, ACT)
    teacher = torch.zeros(2, CHUNK, ACT)
    teacher[0, -1] = 100.0  # differs only on a padded step
    pad = torch.zeros(2, CHUNK, dtype=torch.bool)
    pad[0, -1] = True
    assert masked_distance(student, teacher, pad).tolist() == [0.0, 0.0]
    assert masked_distance(student, teacher, None)[0] > 0


def test_gradient_flows_only_into_the_student() -> None:
    algo, module = trained_lwf()
    perturb(module.policy)
    batch = make_batch(6)
    algo.penalty(module, batch, {}).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())
    teacher = algo._teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    before = algo.teacher_outputs(batch)["action_pred"].clone()
    torch.optim.SGD(module.policy.parameters(), lr=0.5).step()
    torch.testing.assert_close(algo.teacher_outputs(batch)["action_pred"], before, rtol=0, atol=0)
    assert not algo.sample(3)["action_pred"].requires_grad


def test_outputs_from_the_training_step_are_used_without_a_second_forward() -> None:
    algo, module = trained_lwf()
    batch = make_batch(4)
    shifted = module.policy.compute_outputs(batch)["action_pred"].detach() + 1.0
    term = algo.penalty(module, batch, {"action_pred": shifted})  # off by 1 everywhere: l2 of 1 per sample
    torch.testing.assert_close(term, torch.tensor(0.7, dtype=torch.float64))


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("setup_first", [True, False])
def test_state_round_trip_is_exact(setup_first: bool) -> None:
    algo, module = trained_lwf("l1", alpha=0.4)
    perturb(module.policy)
    batch = make_batch(5)
    expected = algo.penalty(module, batch, {}).detach()
    state = _round_trip(algo.state_dict())
    assert json.dumps({k: v for k, v in state.items() if k != "teacher"})  # the rest is plain JSON
    assert all(isinstance(v, torch.Tensor) for v in state["teacher"].values())

    # A resumed run: a fresh policy (other weights) that Lightning then restores to the student's.
    fresh = fake_module(ChunkPolicy(seed=9))
    restored = LwF()
    if setup_first:
        restored.setup(fresh)
        restored.load_state_dict(state)
    else:
        restored.load_state_dict(state)
        restored.setup(fresh)
    fresh.policy.load_state_dict(module.policy.state_dict())
    assert (restored.alpha, restored.distill) == (0.4, "l1")
    torch.testing.assert_close(restored.penalty(fresh, batch, {}), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        _round_trip(restored.state_dict())["teacher"], state["teacher"], rtol=0, atol=0
    )


def test_state_without_a_teacher_round_trips() -> None:
    state = _round_trip(LwF(alpha=2.0).state_dict())
    assert state["teacher"] is None
    algo = LwF()
    algo.load_state_dict(state)
    assert algo.alpha == 2.0 and not algo.has_teacher


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "big"}, "alpha"),
        ({"distill": "kl"}, "distill"),
    ],
)
def test_bad_hyperparameters_are_one_sentence(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        LwF(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_state_and_missing_compute_outputs_are_clear() -> None:
    with pytest.raises(ValueError, match="'er'"):
        LwF().load_state_dict({"name": "er"})
    with pytest.raises(ValueError, match="alpha"):
        LwF().load_state_dict({"name": "lwf", "alpha": -1, "distill": "l2", "teacher": None})

    class NoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    module = fake_module(NoOutputs())
    algo = LwF()
    algo.on_task_end(0, ctx(0, module))
    with pytest.raises(TypeError, match="compute_outputs"):
        algo.penalty(module, make_batch(2), {})


def test_tiny_vla_teacher_matches_an_unchanged_student() -> None:
    from cl_vla.policies.tiny_vla.modeling_tiny_vla import TinyVLAPolicy
    from test_tiny_vla import make_batch as vla_batch
    from test_tiny_vla import make_config

    torch.manual_seed(0)
    module = fake_module(TinyVLAPolicy(make_config(size=16)).eval())  # eval: no dropout in the student
    algo = LwF()
    algo.on_task_end(0, ctx(0, module))
    batch = vla_batch(3, size=16)
    # Not bit-exact: without autograd the teacher's transformer layer takes PyTorch's fused fast path.
    assert algo.penalty(module, batch, {}).item() < 1e-12
    perturb(module.policy)
    assert algo.penalty(module, batch, {}).item() > 1e-3


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_lwf_end_to_end(synthetic_libero, tmp_path) -> None:
    _, ckpt = two_task_run("lwf", synthetic_libero, tmp_path / "run")
    teacher = ckpt["cl_vla"]["algorithm"]["teacher"]
    # Taken at the end of the last task, the teacher is exactly the final policy.
    assert set(teacher) == {k.removeprefix("policy.") for k in ckpt["state_dict"] if k.startswith("policy.")}
    assert all(torch.equal(v, ckpt["state_dict"][f"policy.{k}"]) for k, v in teacher.items())
