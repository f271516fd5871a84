"""ReplayBuffer: the seed's API on top of reservoir-sampled references, exact checkpoints."""

from __future__ import annotations

import inspect
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

import cl_vla
from cl_vla.algorithms import CLAlgorithm, ReplayBuffer, TaskContext
from cl_vla.algorithms.replay_memory import reservoir_sample


class TensorDataset(Dataset):
    """Items are dicts of tensors; counts ``__getitem__`` calls to prove populating decodes nothing."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset, self.gets = n, offset, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.gets += 1
        return {"index": torch.tensor(self.offset + i), "obs": torch.full((3,), float(self.offset + i))}


class FilteredDataset(Dataset):
    """Mimics TaskFilteredDataset: ``frame_indices`` into a shared ``base_dataset``."""

    def __init__(self, base_dataset: Dataset, frame_indices: list[int]) -> None:
        self.base_dataset, self.frame_indices = base_dataset, frame_indices

    def __len__(self) -> int:
        return len(self.frame_indices)

    def __getitem__(self, i: int) -> dict:
        return self.base_dataset[self.frame_indices[i]]


def filled(num_tasks: int = 3, per_task: int = 40, **kwargs) -> tuple[ReplayBuffer, TensorDataset]:
    """A buffer over ``num_tasks`` disjoint slices of one shared dataset (task t owns [t*per_task, ...))."""
    base = TensorDataset(num_tasks * per_task)
    buf = ReplayBuffer(**kwargs)
    for t in range(num_tasks):
        buf.populate_from_dataset(t, FilteredDataset(base, list(range(t * per_task, (t + 1) * per_task))))
    return buf, base


# ---- seed API ----------------------------------------------------------------------------------


def test_seed_api_and_defaults() -> None:
    assert cl_vla.ReplayBuffer is ReplayBuffer and cl_vla.CLAlgorithm is CLAlgorithm
    assert cl_vla.__version__ == "0.1.0"
    params = inspect.signature(ReplayBuffer).parameters
    assert {k: v.default for k, v in params.items()} == {
        "buffer_size_per_task": 500,
        "seed": 42,
        "replay_batch_ratio": 0.3,
        "balanced_sampling": False,
    }
    assert inspect.signature(ReplayBuffer.populate_from_dataset).parameters["num_samples"].default is None
    buf = ReplayBuffer()
    assert isinstance(buf, CLAlgorithm)
    assert (buf.buffer_size_per_task, buf.seed, buf.replay_batch_ratio) == (500, 42, 0.3)
    assert buf.sample(4) == [] and buf.sample_balanced(4) == [] and buf.get_task_ids() == []
    assert buf.replay_indices(4, np.random.default_rng(0)) == []
    assert buf.observe({"x": torch.zeros(1)}) is None
    assert buf.balanced_sampling is False


def test_populate_sizes_and_num_samples() -> None:
    buf = ReplayBuffer(buffer_size_per_task=10)
    buf.populate_from_dataset(0, TensorDataset(100))
    buf.populate_from_dataset(1, TensorDataset(4))  # smaller than the buffer: keep everything
    buf.populate_from_dataset(2, TensorDataset(100), num_samples=7)
    buf.populate_from_dataset(3, TensorDataset(5), num_samples=50)
    assert buf.get_task_ids() == [0, 1, 2, 3]
    assert [buf.get_task_size(t) for t in range(5)] == [10, 4, 7, 5, 0]
    assert sorted(buf.state_dict()["tasks"]["1"]["refs"]) == [0, 1, 2, 3]
    buf.populate_from_dataset(0, TensorDataset(100), num_samples=3)  # re-populating replaces
    assert buf.get_task_size(0) == 3


# ---- reservoir sampling ------------------------------------------------------------------------


def test_reservoir_inclusion_is_k_over_n() -> None:
    n, k, runs = 20, 5, 4000
    counts = np.zeros(n)
    for seed in range(runs):
        counts[reservoir_sample(np.arange(n), k, np.random.default_rng(seed))] += 1
    expected = runs * k / n
    sd = np.sqrt(runs * (k / n) * (1 - k / n))
    assert np.all(np.abs(counts - expected) < 5 * sd), counts


def test_reservoir_every_subset_equally_likely() -> None:
    # Chi-square over all C(6, 2) = 15 subsets; 36.12 is chi2(14)'s 0.999 quantile.
    n, k, runs = 6, 2, 3000
    buf = ReplayBuffer(buffer_size_per_task=k)
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(runs):
        buf.seed = seed
        buf.populate_from_dataset(0, TensorDataset(n))
        counts[tuple(sorted(buf.state_dict()["tasks"]["0"]["refs"]))] += 1
    subsets = list(itertools.combinations(range(n), k))
    assert set(counts) == set(subsets)
    expected = runs / len(subsets)
    chi2 = sum((counts[s] - expected) ** 2 / expected for s in subsets)
    assert chi2 < 36.12, (chi2, counts)


def test_reservoir_is_one_pass_algorithm_r() -> None:
    # Streaming one more item either leaves the reservoir unchanged or replaces exactly one slot,
    # which a shuffle-then-truncate "reservoir" does not satisfy.
    stream = np.arange(100, 160)
    k = 8
    previous = reservoir_sample(stream[:k], k, np.random.default_rng(3))
    for n in range(k + 1, len(stream) + 1):
        current = reservoir_sample(stream[:n], k, np.random.default_rng(3))
        changed = np.flatnonzero(current != previous)
        assert len(changed) <= 1
        if len(changed):
            assert current[changed[0]] == stream[n - 1]
        previous = current


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 50), seed=st.integers(-(2**40), 2**40))
def test_reservoir_is_a_subset_of_the_stream(n: int, k: int, seed: int) -> None:
    base = TensorDataset(n + 1000)
    frames = list(range(1000, 1000 + n))
    buf = ReplayBuffer(buffer_size_per_task=k, seed=seed)
    buf.populate_from_dataset(5, FilteredDataset(base, frames))
    refs = buf.state_dict()["tasks"]["5"]["refs"]
    assert len(refs) == min(n, k) and len(set(refs)) == len(refs) and set(refs) <= set(frames)


def test_population_is_deterministic_across_instances() -> None:
    a, _ = filled(buffer_size_per_task=10, seed=7)
    b, _ = filled(buffer_size_per_task=10, seed=7)
    c, _ = filled(buffer_size_per_task=10, seed=8)
    assert a.state_dict() == b.state_dict()
    assert a.state_dict()["tasks"] != c.state_dict()["tasks"]
    # Each task's reservoir depends on (seed, task_id) only, not on what was populated before it.
    d = ReplayBuffer(buffer_size_per_task=10, seed=7)
    base = TensorDataset(120)
    d.populate_from_dataset(2, FilteredDataset(base, list(range(80, 120))))
    assert d.state_dict()["tasks"]["2"] == a.state_dict()["tasks"]["2"]
    assert [x["index"].item() for x in a.sample(6)] == [x["index"].item() for x in b.sample(6)]


# ---- references, not frames --------------------------------------------------------------------


def test_stores_references_not_tensors() -> None:
    base = TensorDataset(200)
    task = FilteredDataset(base, list(range(50, 150)))
    plain = TensorDataset(30)
    buf = ReplayBuffer(buffer_size_per_task=20)
    buf.populate_from_dataset(0, task)
    buf.populate_from_dataset(1, plain)
    assert base.gets == 0 and plain.gets == 0  # populating decoded nothing
    state = buf.state_dict()
    refs0, refs1 = state["tasks"]["0"]["refs"], state["tasks"]["1"]["refs"]
    assert all(type(r) is int for r in refs0 + refs1)
    assert set(refs0) <= set(range(50, 150))  # global indices into base_dataset
    assert set(refs1) <= set(range(30))  # positions into the dataset itself
    assert buf.memory_bytes() == 8 * (len(refs0) + len(refs1))
    assert len(json.dumps(state)) < 2000


def test_sample_returns_the_referenced_items() -> None:
    base = TensorDataset(100)
    buf = ReplayBuffer(buffer_size_per_task=10)
    buf.populate_from_dataset(0, FilteredDataset(base, list(range(60, 100))))
    buf.populate_from_dataset(1, TensorDataset(10, offset=1000))
    stored = set(buf.state_dict()["tasks"]["0"]["refs"]) | {1000 + r for r in range(10)}
    for batch in (buf.sample(8), buf.sample_balanced(8), buf.sample(50)):
        assert all(isinstance(x, dict) and set(x) == {"index", "obs"} for x in batch)
        assert {x["index"].item() for x in batch} <= stored
        for x in batch:
            assert torch.equal(x["obs"], torch.full((3,), float(x["index"].item())))
    assert len(buf.sample(8)) == 8 and len(buf.sample(50)) == 50  # with replacement past 20 stored
    assert len({x["index"].item() for x in buf.sample(20)}) == 20  # without replacement up to 20
    assert buf.sample(0) == []


# ---- drawing -----------------------------------------------------------------------------------


def test_uniform_sampling_is_proportional_to_stored_sizes() -> None:
    base = TensorDataset(100)
    buf = ReplayBuffer(buffer_size_per_task=30)
    buf.populate_from_dataset(0, FilteredDataset(base, list(range(10))))  # 10 stored
    buf.populate_from_dataset(1, FilteredDataset(base, list(range(10, 100))))  # 30 stored
    rng = np.random.default_rng(0)
    draws = np.array([i for _ in range(500) for i in buf.replay_indices(8, rng)])
    share0 = np.mean(draws < 10)
    assert abs(share0 - 0.25) < 0.03, share0


def test_balanced_covers_every_task_with_more_tasks_than_slots() -> None:
    buf, _ = filled(num_tasks=10, per_task=20, buffer_size_per_task=5, balanced_sampling=True)
    rng = np.random.default_rng(0)
    seen: Counter[int] = Counter()
    for _ in range(300):
        draw = buf.replay_indices(3, rng)
        tasks = [i // 20 for i in draw]
        assert len(draw) == 3 and len(set(tasks)) == 3  # the remainder goes to distinct tasks
        seen.update(tasks)
    assert set(seen) == set(range(10))
    assert max(seen.values()) - min(seen.values()) < 60  # ~90 each: no bias toward the first tasks


def test_balanced_gives_each_task_its_floor_share() -> None:
    buf, _ = filled(num_tasks=4, per_task=20, buffer_size_per_task=3, balanced_sampling=True)
    rng = np.random.default_rng(1)
    for _ in range(20):
        counts = Counter(i // 20 for i in buf.replay_indices(10, rng))
        assert sorted(counts.values()) == [2, 2, 3, 3]
    balanced = Counter(x["index"].item() // 20 for x in buf.sample_balanced(9))
    assert sorted(balanced.values()) == [2, 2, 2, 3]


def test_replay_indices_is_reproducible_from_the_given_rng() -> None:
    buf, _ = filled()
    a = buf.replay_indices(16, np.random.default_rng(5))
    b = buf.replay_indices(16, np.random.default_rng(5))
    assert a == b and all(type(i) is int for i in a)


# ---- checkpointing -----------------------------------------------------------------------------


@pytest.mark.parametrize("balanced", [False, True])
def test_state_round_trip_through_json_gives_identical_draws(balanced: bool) -> None:
    buf, base = filled(buffer_size_per_task=7, seed=11, balanced_sampling=balanced)
    plain = TensorDataset(12, offset=500)
    buf.populate_from_dataset(3, plain)
    buf.sample(5)  # advance the internal generator: its state must be saved too
    state = json.loads(json.dumps(buf.state_dict()))

    restored = ReplayBuffer()  # hyperparameters come from the state
    restored.load_state_dict(state)
    hparams = ("buffer_size_per_task", "seed", "replay_batch_ratio", "balanced_sampling")
    assert [getattr(restored, k) for k in hparams] == [getattr(buf, k) for k in hparams]
    assert restored.get_task_ids() == [0, 1, 2, 3]
    assert restored.state_dict() == buf.state_dict()
    assert restored.replay_indices(9, np.random.default_rng(2)) == buf.replay_indices(
        9, np.random.default_rng(2)
    )
    assert base.gets > 0  # populate decoded nothing, sample did

    with pytest.raises(RuntimeError, match=r"attach_dataset\(task_id, dataset\)"):
        restored.sample(3)
    for t in range(3):
        restored.attach_dataset(t, base)  # the shared dataset works for frame_indices references
    restored.attach_dataset(3, plain)
    for _ in range(3):
        ours = [x["index"].item() for x in restored.sample(6)]
        theirs = [x["index"].item() for x in buf.sample(6)]
        assert ours == theirs
        assert [x["index"].item() for x in restored.sample_balanced(5)] == [
            x["index"].item() for x in buf.sample_balanced(5)
        ]


def test_attach_dataset_rejects_mismatches() -> None:
    buf, _ = filled(per_task=40)
    restored = ReplayBuffer()
    restored.load_state_dict(buf.state_dict())
    with pytest.raises(KeyError, match="task 9"):
        restored.attach_dataset(9, TensorDataset(200))
    with pytest.raises(ValueError, match="task 2"):
        restored.attach_dataset(2, TensorDataset(5))  # too short for task 2's references


def test_load_rejects_foreign_state() -> None:
    with pytest.raises(ValueError, match="sequential"):
        ReplayBuffer().load_state_dict({"name": "sequential"})


# ---- errors, hooks, clear ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_buffer_size(size) -> None:
    with pytest.raises(ValueError, match="buffer_size_per_task"):
        ReplayBuffer(buffer_size_per_task=size)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_replay_batch_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"replay_batch_ratio.*\[0, 1\)"):
        ReplayBuffer(replay_batch_ratio=ratio)


@pytest.mark.parametrize("num", [0, -1])
def test_bad_num_samples(num: int) -> None:
    with pytest.raises(ValueError, match=f"num_samples.*{num}"):
        ReplayBuffer().populate_from_dataset(0, TensorDataset(10), num_samples=num)


def test_other_bad_values() -> None:
    buf = ReplayBuffer()
    with pytest.raises(ValueError, match="empty"):
        buf.populate_from_dataset(0, TensorDataset(0))
    with pytest.raises(ValueError, match="task_id"):
        buf.populate_from_dataset(-1, TensorDataset(3))
    buf.populate_from_dataset(0, TensorDataset(3))
    with pytest.raises(ValueError, match="-2"):
        buf.sample(-2)
    assert ReplayBuffer(replay_batch_ratio=0.0).replay_batch_ratio == 0.0


def test_on_task_end_with_context_populates() -> None:
    base = TensorDataset(50)
    task = FilteredDataset(base, list(range(20, 50)))
    buf = ReplayBuffer(buffer_size_per_task=8)
    buf.on_task_end(0)  # no context: nothing to populate from
    buf.on_task_end(0, TaskContext(task_id=0, task_name="a", num_tasks=2))
    assert buf.get_task_ids() == []
    buf.on_task_end(1, TaskContext(task_id=1, task_name="b", num_tasks=2, train_dataset=task))
    assert buf.get_task_ids() == [1] and buf.get_task_size(1) == 8
    direct = ReplayBuffer(buffer_size_per_task=8)
    direct.populate_from_dataset(1, task)
    assert buf.state_dict() == direct.state_dict()


def test_clear() -> None:
    buf, _ = filled()
    assert len(buf) == 3 * 40 and buf.memory_bytes() > 0
    buf.clear()
    assert buf.get_task_ids() == [] and buf.get_task_size(0) == 0 and buf.memory_bytes() == 0
    assert buf.sample(4) == [] and buf.replay_indices(4, np.random.default_rng(0)) == []
    assert buf.state_dict()["tasks"] == {}
