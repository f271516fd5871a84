"""GEM and A-GEM: the projections against brute force / by hand, the hooks on a small model, exact state."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn
from torch.utils.data import Dataset

from cl_vla.algorithms import TaskContext
from cl_vla.algorithms.agem import AGEM, agem_project
from cl_vla.algorithms.gem import GEM, flat_grad, gem_project
from conftest import train_in_process

# ---- the projections --------------------------------------------------------------------------------


def _brute_force(g: np.ndarray, G: np.ndarray) -> np.ndarray:
    """argmin_z 1/2 |z - g|^2 s.t. G z >= 0, by a general constrained solver (SLSQP)."""
    res = minimize(
        lambda z: 0.5 * np.sum((z - g) ** 2),
        x0=np.zeros_like(g),
        jac=lambda z: z - g,
        constraints=[{"type": "ineq", "fun": lambda z: G @ z, "jac": lambda z: G}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


def _violating_instances(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    while len(out) < count:
        n, k = int(rng.integers(3, 9)), int(rng.integers(1, 5))
        g, G = rng.normal(size=n), rng.normal(size=(k, n))
        if (G @ g < 0).any():
            out.append((g, G))
    return out


@pytest.mark.parametrize(("g", "G"), _violating_instances(12))
def test_gem_projection_is_the_closest_non_conflicting_gradient(g: np.ndarray, G: np.ndarray) -> None:
    out = gem_project(torch.from_numpy(g), torch.from_numpy(G), margin=0.0).numpy()
    assert (G @ out >= -1e-9).all()
    expected = _brute_force(g, G)
    assert np.linalg.norm(out - g) <= np.linalg.norm(expected - g) + 1e-7
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_gem_projection_handles_rank_deficient_memories() -> None:
    rng = np.random.default_rng(3)
    g, row = rng.normal(size=6), rng.normal(size=6)
    row -= (row @ g) / (g @ g) * g + 0.5 * g  # guarantees a conflict
    G = np.stack([row, row, 2 * row, np.zeros(6)])
    out = gem_project(torch.from_numpy(g), torch.from_numpy(G)).numpy()
    np.testing.assert_allclose(out, _brute_force(g, G), atol=1e-6)
    np.testing.assert_allclose(out, g - (g @ row) / (row @ row) * row, atol=1e-9)  # one active plane


def test_gem_projection_leaves_a_non_conflicting_gradient_alone() -> None:
    g = torch.tensor([1.0, 2.0, -0.5])
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert gem_project(g, G, margin=0.5) is g
    assert gem_project(g, torch.zeros(0, 3)) is g


@pytest.mark.parametrize(("g", "G"), _violating_instances(4))
def test_gem_margin_projects_the_shifted_gradient(g: np.ndarray, G: np.ndarray) -> None:
    # v >= γ (the paper's memory_strength) is the projection of g + γ G^T 1 onto the same cone.
    margin = 0.3
    out = gem_project(torch.from_numpy(g), torch.from_numpy(G), margin=margin).numpy()
    assert (G @ out >= -1e-9).all()
    np.testing.assert_allclose(out, _brute_force(g + margin * G.sum(axis=0), G), atol=1e-5)


def test_agem_formula_by_hand() -> None:
    g, ref = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g.ref = -1, ref.ref = 2: g - (-1/2) ref = (0.5, 0.5), orthogonal to ref.
    out = agem_project(g, ref)
    assert torch.allclose(out, torch.tensor([0.5, 0.5])) and float(out @ ref) == 0.0
    g3, ref3 = torch.tensor([3.0, -4.0, 1.0]), torch.tensor([0.0, 2.0, 0.0])
    assert torch.allclose(agem_project(g3, ref3), torch.tensor([3.0, 0.0, 1.0]))  # -8/4 * (0,2,0)
    ok = torch.tensor([1.0, 1.0])
    assert agem_project(ok, ref) is ok  # g.ref = 0: no conflict
    assert agem_project(g, torch.zeros(2)) is g


# ---- the hooks on a small model -------------------------------------------------------------------


class Frames(Dataset):
    """A shared dataset of frames; frame i has input x_i and target y_i."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(n, 4, generator=gen), torch.randn(n, 2, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class TaskFrames(Dataset):
    """Mimics TaskFilteredDataset: ``frame_indices`` into a shared ``base_dataset``."""

    def __init__(self, base: Frames, frame_indices: Sequence[int]) -> None:
        self.base_dataset, self.frame_indices = base, np.asarray(frame_indices)

    def __len__(self) -> int:
        return len(self.frame_indices)

    def __getitem__(self, i: int) -> dict:
        return self.base_dataset[int(self.frame_indices[i])]


class ToyModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.policy = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.seen: list[list[int]] = []

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        self.seen.append(batch["index"].tolist())
        return nn.functional.mse_loss(self.policy(batch["x"]), batch["y"]), {}


def _filled(algo: GEM, tasks: int = 3) -> tuple[Frames, list[TaskFrames]]:
    base = Frames(30 * tasks)
    datasets = [TaskFrames(base, range(30 * t, 30 * (t + 1))) for t in range(tasks)]
    for t, ds in enumerate(datasets):
        algo.on_task_end(t, TaskContext(task_id=t, task_name=str(t), num_tasks=tasks, train_dataset=ds))
    return base, datasets


def _grad_on(module: ToyModule, base: Frames, indices: list[int]) -> torch.Tensor:
    params = list(module.policy.parameters())
    loss = nn.functional.mse_loss(module.policy(base.x[indices]), base.y[indices])
    return flat_grad(params, torch.autograd.grad(loss, params))


def _current_gradient(module: ToyModule, base: Frames, direction: torch.Tensor | None = None) -> torch.Tensor:
    """Set ``.grad`` as backward would (optionally to a given vector) and return it flat."""
    params = list(module.policy.parameters())
    module.policy.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(module.policy(base.x[:5]), base.y[:5] + 3)
    loss.backward()
    if direction is not None:
        offset = 0
        for p in params:
            p.grad.copy_(direction[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return flat_grad(params).clone()


def test_gem_after_backward_projects_against_each_tasks_memory_gradient() -> None:
    algo = GEM(memory_per_task=6, memory_batch_size=4, margin=0.0, seed=1)
    module = ToyModule()
    base, _ = _filled(algo, tasks=2)
    assert [algo.memory.size(t) for t in (0, 1)] == [6, 6]
    assert all(30 * t <= r < 30 * (t + 1) for t in (0, 1) for r in algo.memory.refs(t))
    # A current gradient opposed to the memories' gradients forces a projection.
    memory = [int(r) for t in (0, 1) for r in algo.memory.refs(t)]
    g = -_grad_on(module, base, memory)
    _current_gradient(module, base, direction=g)
    module.seen.clear()
    algo.after_backward(module, {})
    frames = module.seen  # the memory frames each past task's gradient was taken on
    assert len(frames) == 2 and all(len(f) == 4 for f in frames)
    assert set(frames[0]) <= set(algo.memory.refs(0).tolist())
    assert set(frames[1]) <= set(algo.memory.refs(1).tolist())
    G = torch.stack([_grad_on(module, base, f) for f in frames])
    expected = gem_project(g, G)
    out = flat_grad(list(module.policy.parameters()))
    assert bool((G @ g < 0).any()) and not torch.allclose(expected, g)
    assert torch.allclose(out, expected, atol=1e-6) and (G @ out >= -1e-5).all()
    assert algo.num_projections == 1 and algo.num_steps == 1


def test_gem_after_backward_keeps_a_harmless_gradient_and_no_memory_means_no_work() -> None:
    algo = GEM(memory_per_task=6, memory_batch_size=6, margin=0.0)
    module = ToyModule()
    base = Frames(10)
    g = _current_gradient(module, base)
    algo.after_backward(module, {})  # nothing stored yet
    assert module.seen == [] and torch.equal(flat_grad(list(module.policy.parameters())), g)
    algo.on_task_end(
        0, TaskContext(task_id=0, task_name="0", num_tasks=2, train_dataset=TaskFrames(base, [0]))
    )
    # The memory's own gradient never conflicts with itself: g is left bit-identical.
    module.seen.clear()
    g = _current_gradient(module, base, direction=_grad_on(module, base, [0]))
    algo.after_backward(module, {})
    assert module.seen == [[0]] and torch.equal(flat_grad(list(module.policy.parameters())), g)
    assert algo.num_projections == 0


def test_agem_after_backward_uses_one_reference_batch_across_tasks() -> None:
    algo = AGEM(memory_per_task=5, memory_batch_size=8, seed=2)  # a batch may exceed one task's memory
    module = ToyModule()
    base, _ = _filled(algo, tasks=3)
    g = -_grad_on(module, base, [int(r) for t in range(3) for r in algo.memory.refs(t)])
    _current_gradient(module, base, direction=g)
    module.seen.clear()
    algo.after_backward(module, {})
    (frames,) = module.seen
    stored = {int(r) for t in range(3) for r in algo.memory.refs(t)}
    assert len(frames) == 8 and len(set(frames)) == 8 and set(frames) <= stored
    ref = _grad_on(module, base, frames)
    out = flat_grad(list(module.policy.parameters()))
    assert float(g @ ref) < 0 and algo.num_projections == 1
    assert torch.allclose(out, g - (g @ ref) / (ref @ ref) * ref, atol=1e-6)
    assert abs(float(out @ ref)) < 1e-5


def test_memory_draws_follow_the_step_counter_and_survive_a_checkpoint() -> None:
    algo = GEM(memory_per_task=10, memory_batch_size=3, margin=0.5, seed=4)
    module = ToyModule()
    base, datasets = _filled(algo, tasks=2)
    for _ in range(2):
        _current_gradient(module, base)
        algo.after_backward(module, {})
    buf = io.BytesIO()
    torch.save(algo.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    json.dumps(state)  # plain values only
    restored = GEM(memory_per_task=50, memory_batch_size=1, seed=0)
    restored.load_state_dict(state)
    assert restored.state_dict() == algo.state_dict()
    with pytest.raises(RuntimeError, match="attach_dataset"):
        restored.after_backward(module, {})
    for t, ds in enumerate(datasets):
        restored.attach_dataset(t, ds)
    draws = []
    for a in (algo, restored):
        module.seen.clear()
        _current_gradient(module, base)
        a.after_backward(module, {})
        draws.append(list(module.seen))
    assert draws[0] == draws[1]
    assert algo.state_dict() == restored.state_dict()
    with pytest.raises(ValueError, match="gem"):
        restored.load_state_dict({**state, "name": "agem"})


def test_sample_returns_memory_frames() -> None:
    algo = AGEM(memory_per_task=4, memory_batch_size=2)
    assert algo.sample(3) == []
    _filled(algo, tasks=2)
    items = algo.sample(5)
    stored = {int(r) for t in range(2) for r in algo.memory.refs(t)}
    assert len(items) == 5 and {int(i["index"]) for i in items} <= stored


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (GEM, {"memory_per_task": 8, "memory_batch_size": 16}, "smaller than one memory batch"),
        (GEM, {"margin": -0.1}, "margin"),
        (GEM, {"margin": float("nan")}, "margin"),
        (GEM, {"memory_per_task": 0}, "memory_per_task"),
        (GEM, {"memory_batch_size": 2.5}, "memory_batch_size"),
        (AGEM, {"memory_per_task": -3}, "memory_per_task"),
        (AGEM, {"memory_batch_size": True}, "memory_batch_size"),
    ],
)
def test_bad_hyperparameters_are_one_sentence(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        cls(**kwargs)
    assert len(str(err.value).splitlines()) == 1


def test_agem_allows_a_reference_batch_larger_than_one_tasks_memory() -> None:
    assert AGEM(memory_per_task=4, memory_batch_size=16).memory_batch_size == 16


# ---- real runs ---------------------------------------------------------------------------------------


def real_run(algo: str, dataset_factory: Callable, tmp_path: Path, extra: Sequence[str] = ()) -> Path:
    """A run on 2 synthetic tasks, 10 steps each (in this process); returns the run directory."""
    from cl_vla.data.task_sequences import get_task_sequence

    spec = {"episodes_per_task": 3, "frames_per_episode": 8, "image_size": 16}
    tasks = list(get_task_sequence("libero_spatial").tasks[:2])
    root, repo_id, _ = dataset_factory(tasks, **spec)
    run_dir = tmp_path / algo
    train_in_process(
        [
            f"algorithm={algo}",
            "task_sequence=custom",
            f"task_sequence.name=two_{algo}",
            "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
            f"data.root={root}",
            f"data.repo_id={repo_id}",
            *(f"data.synthetic.{k}={v}" for k, v in spec.items()),
            "trainer.progress_bar=false",
            "data.num_workers=0",
            "data.batch_size=8",
            "model.image_size=16",
            "trainer.warmup_steps=2",
            "continual_learning.steps_per_task=10",
            "logger=none",
            *extra,
        ],
        run_dir,
    )
    assert (run_dir / "results.json").is_file()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["gem", "agem"])
def test_real_run(algo: str, synthetic_dataset_factory, tmp_path: Path) -> None:
    run_dir = real_run(
        algo,
        synthetic_dataset_factory,
        tmp_path,
        ["algorithm.memory_per_task=16", "algorithm.memory_batch_size=8"],
    )
    ckpt = torch.load(run_dir / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["cl_vla"]["algorithm"]
    assert state["name"] == algo and state["num_steps"] == 10  # one memory gradient per step of task 1
    assert sorted(state["memory"]) == ["0", "1"]
