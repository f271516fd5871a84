"""DER++: outputs recorded at storage time, the alpha term zero right after storage and the paper's
per-sample weights after the model moves, beta's reweighting, exact state, bad values; one short run.

The math uses a tiny float64 chunk policy (from test_lwf) and a list dataset whose items carry an
``index`` different from their position, as a task's frames do in the shared LeRobot dataset.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cl_vla.algorithms.base import TaskContext
from cl_vla.algorithms.der import DERpp, forked_rng, take_rows
from conftest import two_task_run
from test_lwf import ACT, CHUNK, ChunkPolicy, fake_module, perturb

OFFSET = 100  # items' dataset ``index`` = OFFSET + position

# ---------------------------------------------------------------------------------------- harness


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.action = torch.randn(n, CHUNK, ACT, generator=g, dtype=torch.float64)
        self.pad = torch.zeros(n, CHUNK, dtype=torch.bool)
        self.pad[::3, -1] = True

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {
            "x": self.x[i],
            "action": self.action[i],
            "action_is_pad": self.pad[i],
            "index": OFFSET + i,
            "task": "a",
        }


def make_ctx(task: int, module, dataset) -> TaskContext:
    def compute_loss(raw: dict):
        loss, info = module.policy.forward(raw)
        return loss, {"batch": raw, **info}

    return TaskContext(
        task_id=task,
        task_name=str(task),
        num_tasks=3,
        module=module,
        train_dataset=dataset,
        make_loader=lambda ds, **kw: DataLoader(ds, **kw),
        compute_loss=compute_loss,
    )


def stored_algo(**kwargs) -> tuple[DERpp, object, ListDataset]:
    module = fake_module(ChunkPolicy())
    dataset = ListDataset(10)
    algo = DERpp(**{"buffer_size_per_task": 6, "store_batch_size": 4, **kwargs})
    algo.on_task_end(0, make_ctx(0, module, dataset))
    return algo, module, dataset


def mixed_batch(algo: DERpp, dataset: ListDataset, n_current: int = 3) -> tuple[dict, list[int]]:
    """``n_current`` fresh items followed by the first three stored references, as the sampler mixes them."""
    current = [dataset[i] | {"index": 900 + i, "x": dataset[i]["x"] + 1} for i in range(n_current)]
    replayed = [dataset[int(r)] for r in algo.memory.refs(0)[:3]]
    batch = torch.utils.data.default_collate(current + replayed)
    return batch, list(range(n_current, n_current + 3))


def per_sample_mse(pred, target, pad):
    valid = (~pad).double()
    return ((pred - target).square() * valid[..., None]).sum((1, 2)) / (valid.sum(1) * ACT)


# ------------------------------------------------------------------------------------------- math


def test_stored_outputs_equal_the_models_outputs_at_storage_time() -> None:
    algo, module, dataset = stored_algo()
    refs = algo.memory.refs(0)
    assert len(refs) == 6
    # Recorded in batches of store_batch_size=4 (a GEMM's rounding may depend on the batch's size).
    chunks = [[dataset[int(r)] for r in refs[i : i + 4]] for i in (0, 4)]
    expected = torch.cat(
        [module.policy.compute_outputs(torch.utils.data.default_collate(c))["action_pred"] for c in chunks]
    ).detach()
    torch.testing.assert_close(algo.stored_outputs(0), expected, rtol=0, atol=0)
    assert algo._keys[0].tolist() == [OFFSET + int(r) for r in refs]  # keyed by the items' index
    assert module.policy.training  # recording ran in eval mode and restored the mode
    perturb(module.policy)
    torch.testing.assert_close(algo.stored_outputs(0), expected, rtol=0, atol=0)  # a copy, not a view


def test_alpha_term_is_zero_right_after_storage_then_the_papers_weighting() -> None:
    algo, module, dataset = stored_algo(alpha=0.3, beta=1.0)
    batch, rows = mixed_batch(algo, dataset)
    # Zero up to float64 rounding (the GEMM here runs on another batch size than at storage).
    assert algo.penalty(module, batch, {}).item() < 1e-25
    perturb(module.policy)
    pred = module.policy.compute_outputs(batch)["action_pred"]
    stored = algo.stored_outputs(0)[:3]
    mse = per_sample_mse(pred[rows], stored, batch["action_is_pad"][rows])
    # Each replayed sample carries alpha times a current sample's weight 1/B.
    expected = 0.3 * mse.sum() / len(batch["index"])
    term = algo.penalty(module, batch, {})
    assert term.item() > 0
    torch.testing.assert_close(term, expected, rtol=1e-12, atol=0)


def test_beta_reweights_the_replayed_samples_standard_loss() -> None:
    algo, module, dataset = stored_algo(alpha=0.0, beta=0.25)
    batch = {k: v for k, v in mixed_batch(algo, dataset)[0].items()}
    batch["action_is_pad"] = torch.zeros_like(batch["action_is_pad"])  # per-sample means average exactly
    size = len(batch["index"])
    policy = module.policy
    total = policy.forward(batch)[0] + algo.penalty(module, batch, {})
    per = policy.action_loss(policy.compute_outputs(batch)["action_pred"], batch["action"], None, "none")
    weights = torch.tensor([1.0] * (size - 3) + [0.25] * 3, dtype=torch.float64)
    torch.testing.assert_close(total, (weights * per).sum() / size, rtol=1e-12, atol=0)


def test_no_term_without_replayed_rows_or_with_neutral_weights() -> None:
    algo, module, dataset = stored_algo()
    current = torch.utils.data.default_collate([dataset[i] | {"index": 900 + i} for i in range(4)])
    assert algo.penalty(module, current, {}) is None
    assert DERpp().penalty(module, current, {}) is None  # nothing stored yet
    neutral, _, _ = stored_algo(alpha=0.0, beta=1.0)
    assert neutral.penalty(module, mixed_batch(neutral, dataset)[0], {}) is None


def test_outputs_from_the_training_step_are_used_for_the_replayed_rows() -> None:
    algo, module, dataset = stored_algo(alpha=1.0, beta=1.0)
    batch, rows = mixed_batch(algo, dataset)
    pred = module.policy.compute_outputs(batch)["action_pred"].detach()
    pred[rows] += 1.0
    sub = take_rows(batch, rows, len(batch["index"]))
    expected = per_sample_mse(pred[rows], algo.stored_outputs(0)[:3], sub["action_is_pad"]).sum() / 6
    torch.testing.assert_close(algo.penalty(module, batch, {"action_pred": pred}), expected)


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_forked_rng_draws_like_a_seeded_run_and_leaves_the_outer_stream_alone() -> None:
    policy = torch.nn.Linear(2, 2)
    torch.manual_seed(7)
    expected_inside = torch.rand(4)
    torch.manual_seed(3)
    expected_outer = torch.rand(4)
    torch.manual_seed(3)
    with forked_rng(policy, seed=7):
        inside = torch.rand(4)
    assert torch.equal(inside, expected_inside)
    assert torch.equal(torch.rand(4), expected_outer)


def test_state_round_trip_is_exact() -> None:
    algo, module, dataset = stored_algo(alpha=0.4, beta=0.6)
    perturb(module.policy)
    batch = mixed_batch(algo, dataset)[0]
    expected = algo.penalty(module, batch, {}).detach()
    state = _round_trip(algo.state_dict())
    restored = DERpp()
    restored.load_state_dict(state)
    restored.attach_dataset(0, dataset)
    assert (restored.alpha, restored.beta, restored.store_batch_size) == (0.4, 0.6, 4)
    torch.testing.assert_close(restored.penalty(module, batch, {}), expected, rtol=0, atol=0)
    torch.testing.assert_close(restored.stored_outputs(0), algo.stored_outputs(0), rtol=0, atol=0)
    assert restored.replay_indices(5, np.random.default_rng(1)) == algo.replay_indices(
        5, np.random.default_rng(1)
    )
    # The seed's sample() continues the same stream and carries the stored outputs.
    a, b = algo.sample(3), restored.sample(3)
    assert [x["index"] for x in a] == [x["index"] for x in b]
    for item in a:
        row = algo._keys[0].tolist().index(item["index"])
        torch.testing.assert_close(item["stored_action_pred"], algo.stored_outputs(0)[row], rtol=0, atol=0)
    assert algo.memory_bytes() > 6 * CHUNK * ACT * 4


def test_repopulating_a_task_drops_its_stale_outputs() -> None:
    algo, module, dataset = stored_algo()
    algo.populate_from_dataset(0, ListDataset(8, seed=3))
    with pytest.raises(KeyError):
        algo.stored_outputs(0)
    assert algo.penalty(module, mixed_batch(algo, dataset)[0], {}) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.2}, "alpha"),
        ({"beta": -1}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"replay_batch_ratio": 0.0}, "replay_batch_ratio"),
        ({"replay_batch_ratio": 1.0}, "replay_batch_ratio"),
        ({"store_batch_size": 0}, "store_batch_size"),
        ({"buffer_size_per_task": 0}, "buffer_size_per_task"),
    ],
)
def test_bad_hyperparameters_are_one_sentence(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        DERpp(**kwargs)
    assert "\n" not in str(err.value)


def test_inconsistent_state_is_rejected() -> None:
    algo, _, _ = stored_algo()
    state = _round_trip(algo.state_dict())
    state["outputs"]["0"] = state["outputs"]["0"][:2]
    with pytest.raises(ValueError, match="task 0"):
        DERpp().load_state_dict(state)
    with pytest.raises(ValueError, match="'er'"):
        DERpp().load_state_dict({**algo.state_dict(), "name": "er"})


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_derpp_end_to_end(synthetic_libero, tmp_path) -> None:
    _, ckpt = two_task_run("derpp", synthetic_libero, tmp_path / "run", "algorithm.buffer_size_per_task=8")
    state = ckpt["cl_vla"]["algorithm"]
    for t in ("0", "1"):
        refs = state["tasks"][t]["refs"]
        assert state["outputs"][t].shape[0] == len(refs) == 8 and torch.isfinite(state["outputs"][t]).all()
        assert state["output_keys"][t].tolist() == refs  # batches' ``index`` = the stored references
