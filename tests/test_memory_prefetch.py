"""Memory batches decoded ahead in loader workers are exactly the ones a step would decode itself:
the prefetcher serves each step in order, after skips, repeats and restarts; GEM, A-GEM and MIR take the
same frames and leave the same gradients with workers as without."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from cl_vla.algorithms.agem import AGEM
from cl_vla.algorithms.base import TaskContext
from cl_vla.algorithms.gem import GEM
from cl_vla.algorithms.gradient_projection import flat_grad
from cl_vla.algorithms.memory_prefetch import MemoryPrefetcher, memory_workers
from cl_vla.algorithms.mir import MIR
from test_gem import ToyModule, _current_gradient, _filled
from test_mir import MLPPolicy, items

pytestmark = pytest.mark.skipif(
    "fork" not in __import__("multiprocessing").get_all_start_methods(), reason="workers are forked here"
)


def _worker_loader(dataset, **kwargs) -> DataLoader:
    return DataLoader(dataset, num_workers=2, multiprocessing_context="fork", **kwargs)


def _load(step: int) -> dict:
    return {"step": torch.tensor(step), "pid": os.getpid()}


def test_each_step_is_served_from_the_workers_in_any_order_of_requests() -> None:
    prefetch = MemoryPrefetcher(_load)
    prefetch.use_loader(_worker_loader)
    asked = [0, 1, 2, 2, 3, 5, 1, 2, 40, 41]  # in order, a repeat, a small skip, back, a jump
    got = [prefetch.get(step, key="memory v1") for step in asked]
    assert [int(b["step"]) for b in got] == asked
    assert all(b["pid"] != os.getpid() for b in got)  # decoded in worker processes
    assert int(prefetch.get(41, key="memory v2")["step"]) == 41  # a new memory restarts the workers
    prefetch.close()


def test_without_workers_the_step_loads_in_this_process() -> None:
    for make_loader in (None, lambda ds, **kw: DataLoader(ds, num_workers=0, **kw)):
        prefetch = MemoryPrefetcher(_load)
        prefetch.use_loader(make_loader)
        batch = prefetch.get(3, key=0)
        assert int(batch["step"]) == 3 and batch["pid"] == os.getpid()


def test_the_context_sets_the_workers_and_zero_decodes_in_the_step() -> None:
    made = []

    def make_loader(ds, **kw):
        made.append(kw.get("num_workers"))
        return DataLoader(ds, multiprocessing_context="fork", **{"num_workers": 2, **kw})

    prefetch = MemoryPrefetcher(_load)
    prefetch.use_loader(make_loader, workers=0)
    assert prefetch.get(3, key=0)["pid"] == os.getpid() and made == []  # no loader built at all
    prefetch.use_loader(make_loader, workers=1)
    assert prefetch.get(3, key=0)["pid"] != os.getpid() and made == [1]
    prefetch.close()


@pytest.mark.parametrize(
    ("setting", "loader", "accelerated", "cores", "threads", "expected"),
    [
        ("auto", 2, False, 2, 2, 0),  # 2-core CPU run: the step's threads and the loader fill it
        ("auto", 2, False, 16, 8, 2),  # 16 cores, 8 threads, 2 loader workers: room for 2 more
        ("auto", 4, True, 16, 16, 4),  # a GPU computes: the main process needs one core
        ("auto", 4, True, 8, 16, 0),  # 8 cores: 4 loader workers + 1 leave 3, fewer than 4
        ("auto", 0, True, 64, 1, 0),  # no loader workers: decoded in the step, as the loader does
        (3, 2, False, 2, 2, 3),  # an explicit count wins
        (0, 4, True, 64, 1, 0),
    ],
)
def test_memory_workers_auto_uses_spare_cores_only(setting, loader, accelerated, cores, threads, expected):
    assert memory_workers(setting, loader, accelerated, cores=cores, threads=threads) == expected


@pytest.mark.parametrize("bad", [-1, "two", 1.5, True])
def test_memory_workers_refuses_anything_but_auto_or_a_count(bad) -> None:
    with pytest.raises(ValueError, match=r"data.memory_workers must be 'auto' or an int >= 0, got"):
        memory_workers(bad, 2, False)


def _context(task: int, make_loader=None) -> TaskContext:
    return TaskContext(task_id=task, task_name=str(task), num_tasks=4, make_loader=make_loader)


@pytest.mark.parametrize("algo_cls", [GEM, AGEM])
def test_episodic_memories_draw_the_same_frames_with_and_without_workers(algo_cls) -> None:
    kwargs = {"memory_per_task": 10, "memory_batch_size": 4, "seed": 3}
    runs = []
    for make_loader in (None, _worker_loader):
        algo, module = algo_cls(**kwargs), ToyModule()
        base, _ = _filled(algo, tasks=3)
        algo.on_task_start(3, _context(3, make_loader))
        grads = []
        for _ in range(4):
            _current_gradient(module, base)
            algo.after_backward(module, {})
            grads.append(flat_grad(list(module.policy.parameters())).clone())
        assert (algo._prefetch._batches is not None) == (make_loader is not None)  # workers ran
        runs.append((module.seen, grads, algo.state_dict()))
        algo.on_task_end(3, None)
    (seen0, grads0, state0), (seen1, grads1, state1) = runs
    assert seen0 == seen1 and len(seen0) == 4 * (3 if algo_cls is GEM else 1)
    assert state0 == state1
    for a, b in zip(grads0, grads1, strict=True):
        assert torch.equal(a, b)


def test_mir_retrieves_the_same_candidates_with_and_without_workers() -> None:
    torch.manual_seed(5)
    xs, ys = torch.randn(40, 3).tolist(), torch.randn(40, 2).tolist()
    runs = []
    for make_loader in (None, _worker_loader):
        algo = MIR(mir_candidates=8, k=3, virtual_lr=0.1, buffer_size_per_task=20, seed=1)
        algo.populate_from_dataset(0, items(xs, ys))
        algo.on_task_start(1, _context(1, make_loader))
        policy = MLPPolicy()
        module = SimpleNamespace(policy=policy, global_step=0, task=1, global_rank=0)
        out = []
        for step in range(3):
            module.global_step = step
            policy.zero_grad(set_to_none=True)
            policy.forward({"x": torch.ones(2, 3, dtype=torch.float64), "y": torch.zeros(2, 2).double()})[
                0
            ].backward()
            algo.after_backward(module, {})
            grads = [p.grad.clone() for p in policy.parameters()]
            out.append((list(algo.last_retrieved), algo.last_scores.clone(), grads))
        runs.append(out)
        algo.on_task_end(1, None)
    for (r0, s0, g0), (r1, s1, g1) in zip(*runs, strict=True):
        assert r0 == r1 and torch.equal(s0, s1)
        assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_an_algorithm_copy_does_not_carry_the_workers() -> None:
    algo = AGEM(memory_per_task=10, memory_batch_size=4)
    module = ToyModule()
    base, _ = _filled(algo, tasks=2)
    algo.on_task_start(2, _context(2, _worker_loader))
    _current_gradient(module, base)
    algo.after_backward(module, {})
    clone = copy.deepcopy(algo)
    assert clone._prefetch._batches is None and clone._prefetch._make_loader is None
    assert clone.state_dict() == algo.state_dict()
    algo.on_task_end(2, None)
