"""EWC: the empirical Fisher, the penalty, online decay, separate terms, exact state, bad values.

Most tests use a tiny float64 policy behind a minimal stand-in for the LightningModule (``.policy`` and
``compute_loss``); one short run goes through ``train.py`` end to end.
"""

from __future__ import annotations

import io
import os
import socket
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cl_vla.algorithms.base import TaskContext
from cl_vla.algorithms.ewc import EWC
from conftest import two_task_run

# ---------------------------------------------------------------------------------------- harness


class TinyPolicy(nn.Module):
    """Two layers; the instruction string scales the output, so samples differ in their non-tensor field."""

    def __init__(self, call_item: bool = False) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.call_item = call_item
        self.double()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        scale = torch.tensor([1.0 if t == "a" else 2.0 for t in batch["task"]], dtype=torch.float64)
        pred = self.l2(torch.tanh(self.l1(batch["x"]))) * scale[:, None] * self.frozen
        loss = (pred - batch["y"]).square().mean()
        # lerobot policies return python floats for logging: torch.func cannot trace .item().
        return loss, ({"loss": loss.item()} if self.call_item else {})


class FakeModule:
    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy

    def compute_loss(self, raw: dict) -> tuple[torch.Tensor, dict]:
        batch = dict(raw)  # the "preprocessor"
        loss, info = self.policy(batch)
        return loss, {"batch": batch, **info}


def make_data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return [{"x": x[i], "y": y[i], "task": "a" if i % 3 else "b"} for i in range(n)]


def make_loader(ds, **kwargs) -> DataLoader:
    return DataLoader(ds, **kwargs)


def context(module: FakeModule, data: list[dict], task: int = 0) -> TaskContext:
    return TaskContext(
        task_id=task,
        task_name=f"t{task}",
        num_tasks=2,
        module=module,
        train_dataset=data,
        make_loader=make_loader,
        compute_loss=module.compute_loss,
    )


def hand_fisher(policy: nn.Module, data: list[dict]) -> dict[str, torch.Tensor]:
    """Mean of squared per-sample gradients, one backward pass per sample."""
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    policy.eval()
    for item in data:
        policy.zero_grad()
        batch = {"x": item["x"][None], "y": item["y"][None], "task": [item["task"]]}
        policy(batch)[0].backward()
        for n, p in params.items():
            acc[n] += p.grad.square()
    policy.zero_grad()
    policy.train()
    return {n: a / len(data) for n, a in acc.items()}


def shift_params(policy: nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def close(a: dict, b: dict, **kw) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


# ------------------------------------------------------------------------------------------ Fisher


@pytest.mark.parametrize("call_item", [False, True], ids=["vmap", "loop_fallback"])
def test_fisher_is_mean_of_per_sample_squared_gradients(call_item: bool) -> None:
    torch.manual_seed(0)
    module = FakeModule(TinyPolicy(call_item=call_item))
    data = make_data(10, seed=1)
    algo = EWC(fisher_samples=100, fisher_batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        algo.on_task_end(0, context(module, data))
    assert module.policy.training  # the mode is restored
    fell_back = [w for w in caught if issubclass(w.category, RuntimeWarning) and "vmap" in str(w.message)]
    assert len(fell_back) == (1 if call_item else 0)  # one warning, not one per batch
    (fisher,) = algo.fishers().values()
    assert "frozen" not in fisher  # only trainable parameters
    close(fisher, hand_fisher(module.policy, data), rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in module.policy.parameters())  # .grad untouched


def test_fisher_uses_evenly_spaced_subset() -> None:
    module = FakeModule(TinyPolicy())
    data = make_data(12, seed=2)
    algo = EWC(fisher_samples=4)
    fisher = algo.compute_fisher(module.policy, module.compute_loss, data, make_loader)
    close(fisher, hand_fisher(module.policy, [data[i] for i in (0, 3, 6, 9)]), rtol=1e-10, atol=1e-14)


def test_batch_fisher_squares_minibatch_gradients() -> None:
    module = FakeModule(TinyPolicy())
    data = make_data(8, seed=3)
    algo = EWC(fisher="batch", fisher_samples=8, fisher_batch_size=4)
    fisher = algo.compute_fisher(module.policy, module.compute_loss, data, make_loader)
    params = dict(module.policy.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in fisher}
    for chunk in (data[:4], data[4:]):
        batch = make_loader(chunk, batch_size=4).__iter__().__next__()
        grads = torch.autograd.grad(module.compute_loss(batch)[0], [params[n] for n in fisher])
        for n, g in zip(fisher, grads, strict=True):
            expected[n] += g.square() / 2
    close(fisher, expected, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------- penalty


def hand_penalty(policy: nn.Module, terms: list[tuple[dict, dict]], lam: float) -> torch.Tensor:
    params = dict(policy.named_parameters())
    return lam / 2 * sum((f[n] * (params[n] - a[n]).square()).sum() for f, a in terms for n in f)


def test_penalty_matches_hand_formula_and_is_zero_at_anchor() -> None:
    module = FakeModule(TinyPolicy())
    algo = EWC(ewc_lambda=7.0)
    assert algo.penalty(module, {}, {}) is None  # nothing before the first task ends
    algo.on_task_end(0, context(module, make_data(6, seed=4)))
    assert float(algo.penalty(module, {}, {}).detach()) == 0.0
    shift_params(module.policy, seed=5)
    pen = algo.penalty(module, {}, {})
    (fisher,), (anchor,) = algo.fishers().values(), algo.anchors().values()
    torch.testing.assert_close(pen, hand_penalty(module.policy, [(fisher, anchor)], 7.0))
    assert pen.dtype == torch.float64 and pen.requires_grad
    pen.backward()  # gradient lambda * F * (theta - theta*)
    p = module.policy.l1.weight
    torch.testing.assert_close(p.grad, 7.0 * fisher["l1.weight"] * (p - anchor["l1.weight"]).detach())


def test_separate_mode_keeps_one_term_per_task() -> None:
    module = FakeModule(TinyPolicy())
    algo = EWC(mode="separate", ewc_lambda=3.0)
    algo.on_task_end(0, context(module, make_data(6, seed=6)))
    shift_params(module.policy, seed=7)
    algo.on_task_end(1, context(module, make_data(6, seed=8), task=1))
    assert algo.num_terms == 2 and sorted(algo.fishers()) == [0, 1]
    shift_params(module.policy, seed=9)
    f, a = algo.fishers(), algo.anchors()
    expected = hand_penalty(module.policy, [(f[0], a[0]), (f[1], a[1])], 3.0)
    torch.testing.assert_close(algo.penalty(module, {}, {}), expected)
    close(algo.sample(0), {n: f[0][n] + f[1][n] for n in f[0]})


def test_online_mode_decays_with_gamma_and_anchors_at_latest() -> None:
    module = FakeModule(TinyPolicy())
    d0, d1 = make_data(6, seed=10), make_data(6, seed=11)
    algo = EWC(mode="online", gamma=0.25, ewc_lambda=2.0)
    algo.on_task_end(0, context(module, d0))
    f0 = hand_fisher(module.policy, d0)
    shift_params(module.policy, seed=12)
    algo.on_task_end(1, context(module, d1, task=1))
    f1 = hand_fisher(module.policy, d1)
    assert algo.num_terms == 1
    (fisher,), (anchor,) = algo.fishers().values(), algo.anchors().values()
    close(fisher, {n: 0.25 * f0[n] + f1[n] for n in f0}, rtol=1e-10, atol=1e-14)
    close(anchor, {n: p.detach() for n, p in module.policy.named_parameters() if p.requires_grad})
    shift_params(module.policy, seed=13)
    torch.testing.assert_close(
        algo.penalty(module, {}, {}), hand_penalty(module.policy, [(fisher, anchor)], 2.0)
    )


# ------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_round_trip_is_exact(mode: str) -> None:
    module = FakeModule(TinyPolicy())
    algo = EWC(mode=mode, ewc_lambda=5.0, gamma=0.5, fisher_samples=5, fisher_batch_size=2)
    algo.on_task_end(0, context(module, make_data(6, seed=14)))
    shift_params(module.policy, seed=15)
    algo.on_task_end(1, context(module, make_data(6, seed=16), task=1))
    shift_params(module.policy, seed=17)
    buf = io.BytesIO()
    torch.save(algo.state_dict(), buf)
    buf.seek(0)
    restored = EWC()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    hparams = ("mode", "ewc_lambda", "gamma", "fisher", "fisher_samples", "fisher_batch_size")
    assert [getattr(restored, k) for k in hparams] == [getattr(algo, k) for k in hparams]
    for got, want in ((restored.fishers(), algo.fishers()), (restored.anchors(), algo.anchors())):
        assert got.keys() == want.keys()
        for t in want:
            close(got[t], want[t], rtol=0, atol=0)
    assert torch.equal(restored.penalty(module, {}, {}), algo.penalty(module, {}, {}))
    with pytest.raises(ValueError, match="si"):
        restored.load_state_dict({**algo.state_dict(), "name": "si"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ewc_lambda": -1.0}, "ewc_lambda"),
        ({"ewc_lambda": float("nan")}, "ewc_lambda"),
        ({"gamma": 0.0}, r"gamma must be in \(0, 1\], got 0.0"),
        ({"gamma": 1.5}, "gamma"),
        ({"fisher_samples": 0}, "fisher_samples must be a positive int, got 0"),
        ({"fisher_samples": -3}, "fisher_samples"),
        ({"fisher_batch_size": 0}, "fisher_batch_size"),
        ({"mode": "offline"}, "mode must be 'separate' or 'online', got 'offline'"),
        ({"fisher": "true"}, "fisher must be 'empirical' or 'batch'"),
    ],
)
def test_bad_values_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EWC(**kwargs)


# --------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        module = FakeModule(TinyPolicy())
        algo = EWC(fisher_samples=7, fisher_batch_size=2)
        fisher = algo.compute_fisher(module.policy, module.compute_loss, make_data(9, seed=18), make_loader)
        torch.save(fisher, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_hold_the_same_fisher_as_one_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    module = FakeModule(TinyPolicy())
    single = EWC(fisher_samples=7, fisher_batch_size=2).compute_fisher(
        module.policy, module.compute_loss, make_data(9, seed=18), make_loader
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    close(ranks[0], ranks[1], rtol=0, atol=0)
    close(ranks[0], single, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_ewc_online_end_to_end(synthetic_libero, tmp_path) -> None:
    extra = ("algorithm.fisher_samples=8", "algorithm.fisher_batch_size=4")
    _, ckpt = two_task_run("ewc_online", synthetic_libero, tmp_path / "run", *extra)
    state = ckpt["cl_vla"]["algorithm"]
    assert state["mode"] == "online" and list(state["importance"]) == ["1"]
    assert all(torch.isfinite(f).all() for f in state["importance"]["1"].values())
