"""PackNet: pruning honours the ratio, frozen weights stay bit-identical, evaluation masks per task."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from cl_vla.algorithms import TaskContext
from cl_vla.algorithms.packnet import PackNet, prunable_parameter_names


class Toy(nn.Module):
    """A conv, an attention block, linears, a norm and a free parameter: every kind PackNet sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.attn = nn.MultiheadAttention(4, num_heads=2, batch_first=True)
        self.fc = nn.Linear(4 * 16, 16)
        self.norm = nn.LayerNorm(16)
        self.query = nn.Parameter(torch.randn(16))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # (B, 4, 4, 4)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 16, 4)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        z = self.norm(torch.relu(self.fc(tokens.flatten(1)))) + self.query
        return self.head(z)


class ToyModule(nn.Module):
    """Stands in for CLPolicyModule: ``policy`` plus ``compute_loss(raw_batch)``."""

    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.1) -> None:
        super().__init__()
        self.policy = Toy()
        self.lr, self.weight_decay = lr, weight_decay

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return nn.functional.mse_loss(self.policy(batch["x"]), batch["y"]), {}


class ToyData(Dataset):
    def __init__(self, n: int, task: int) -> None:
        g = torch.Generator().manual_seed(task)
        self.x = torch.randn(n, 1, 4, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g) + 3 * task

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def _batch(task: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * task + step)
    return {"x": torch.randn(8, 1, 4, 4, generator=g), "y": torch.randn(8, 2, generator=g) + 3 * task}


def _train(algo: PackNet, module: ToyModule, task: int, steps: int, opt: torch.optim.Optimizer) -> None:
    """What the loop does for one task: backward, after_backward, AdamW step, observe."""
    algo.on_task_start(task, TaskContext(task_id=task, task_name=str(task), num_tasks=3, module=module))
    module.policy.train()
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = module.compute_loss(_batch(task, s))
        loss.backward()
        algo.after_backward(module, {})
        opt.step()
        algo.observe({}, module=module)


def _setup(**kwargs) -> tuple[PackNet, ToyModule]:
    torch.manual_seed(0)
    module = ToyModule()
    algo = PackNet(**kwargs)
    algo.setup(module)
    return algo, module


def _params(module: ToyModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def test_prunable_parameters_are_conv_linear_and_attention_weights() -> None:
    names = prunable_parameter_names(Toy())
    assert names == ["conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight", "head.weight"]


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.3])
def test_prune_ratio_is_honoured_per_layer_and_keeps_the_largest(ratio: float) -> None:
    algo, module = _setup(prune_ratio=ratio)
    before = _params(module)
    algo.on_task_end(0)
    after = _params(module)
    for name, owner in algo.owners().items():
        n = owner.numel()
        n_pruned = round(ratio * n)
        assert int((owner == 0).sum()) == n_pruned and int((owner == 1).sum()) == n - n_pruned
        w = before[name]
        assert w[owner == 1].abs().min() >= w[owner == 0].abs().max()  # magnitude pruning
        assert torch.equal(after[name][owner == 1], w[owner == 1]) and not after[name][owner == 0].any()
    # The second task prunes the same share of what was free for it.
    _train(algo, module, 1, 3, torch.optim.AdamW(module.policy.parameters(), lr=1e-2))
    algo.on_task_end(1)
    for owner in algo.owners().values():
        free_for_1 = round(ratio * owner.numel())
        assert int((owner == 2).sum()) == free_for_1 - round(ratio * free_for_1)
        assert int((owner == 0).sum()) == round(ratio * free_for_1)


def test_frozen_weights_stay_bit_identical_under_adamw_and_carried_moments() -> None:
    algo, module = _setup(prune_ratio=0.5)
    # One optimizer across tasks: Adam's moments of the frozen weights are non-zero when task 1 starts,
    # and weight decay shrinks every parameter it holds; both would move frozen weights.
    opt = torch.optim.AdamW(module.policy.parameters(), lr=1e-2, weight_decay=0.5)
    _train(algo, module, 0, 5, opt)
    algo.on_task_end(0)
    frozen = _params(module)
    owners = {n: o.clone() for n, o in algo.owners().items()}
    _train(algo, module, 1, 8, opt)
    now = _params(module)
    for name, value in now.items():
        if name in owners:
            kept = owners[name] == 1
            assert torch.equal(value[kept], frozen[name][kept]), name  # bit-identical
            assert not torch.equal(value[~kept], frozen[name][~kept]), name  # the free ones learned
        else:
            assert torch.equal(value, frozen[name]), name  # shared params: first task only


def test_shared_params_train_on_the_first_task_unless_never() -> None:
    for mode, moves in (("first_task", True), ("never", False)):
        algo, module = _setup(shared_params=mode)
        before = _params(module)
        _train(algo, module, 0, 3, torch.optim.AdamW(module.policy.parameters(), lr=1e-2))
        after = _params(module)
        assert torch.equal(after["norm.bias"], before["norm.bias"]) is not moves
        assert torch.equal(after["query"], before["query"]) is not moves


def _two_tasks() -> tuple[PackNet, ToyModule]:
    algo, module = _setup(prune_ratio=0.5)
    opt = torch.optim.AdamW(module.policy.parameters(), lr=1e-2)
    _train(algo, module, 0, 3, opt)
    algo.on_task_end(0)
    _train(algo, module, 1, 3, opt)
    algo.on_task_end(1)
    return algo, module


def test_eval_context_selects_each_tasks_weights_and_restores_them() -> None:
    algo, module = _two_tasks()
    full = _params(module)
    owners = algo.owners()
    expect_kept = {0: (1,), 1: (1, 2), 2: (0, 1, 2), 7: (0, 1, 2)}  # 2 is not pruned yet, 7 unseen
    for task, kept_owners in expect_kept.items():
        with algo.eval_context(task, module):
            inside = _params(module)
        for name, owner in owners.items():
            keep = torch.zeros_like(owner, dtype=torch.bool)
            for k in kept_owners:
                keep |= owner == k
            assert torch.equal(inside[name][keep], full[name][keep])
            assert not inside[name][~keep].any()
        assert all(torch.equal(v, full[n]) for n, v in _params(module).items())  # put back exactly
    # Task 0's network in evaluation is the one it ended with.
    with algo.eval_context(0, module):
        assert torch.equal(module.policy.fc.weight, module.policy.fc.weight * (owners["fc.weight"] == 1))


def test_evaluation_needs_the_task_identity() -> None:
    algo, module = _two_tasks()
    module.policy.eval()
    x = _batch(0, 0)["x"]
    with pytest.raises(RuntimeError, match="task identity"):
        module.policy(x)
    with algo.eval_context(1, module), torch.no_grad():
        module.policy(x)
    with pytest.raises(ValueError, match="task identity"):
        algo.eval_context(None, module)  # type: ignore[arg-type]
    module.policy.train()
    module.policy(x)  # training mode is never blocked


def test_finetune_moves_only_the_tasks_kept_weights() -> None:
    algo, module = _setup(prune_ratio=0.5, finetune_steps=4, finetune_batch_size=4, finetune_lr=1e-2)
    opt = torch.optim.AdamW(module.policy.parameters(), lr=1e-2)
    _train(algo, module, 0, 3, opt)
    algo.on_task_end(0)
    _train(algo, module, 1, 3, opt)
    before = _params(module)
    owners_before = {n: o.clone() for n, o in algo.owners().items()}
    ctx = TaskContext(task_id=1, task_name="1", num_tasks=3, module=module, train_dataset=ToyData(10, 1))
    algo.on_task_end(1, ctx)
    after = _params(module)
    moved = 0
    for name, owner in algo.owners().items():
        mine = owner == 2
        others = ~mine
        assert torch.equal(after[name][others & (owner != 0)], before[name][others & (owner != 0)])
        assert not after[name][owner == 0].any()  # released weights stay zero
        assert torch.equal(owner[owners_before[name] == 1], owners_before[name][owners_before[name] == 1])
        moved += int((after[name][mine] != before[name][mine]).sum())
    assert moved > 0
    shared = [n for n in after if n not in owners_before]
    assert all(torch.equal(after[n], before[n]) for n in shared)


def test_state_dict_round_trip_is_exact() -> None:
    algo, module = _two_tasks()
    state = algo.state_dict()
    assert all(o.dtype == torch.uint8 for o in state["owners"].values())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    # A fresh run: same architecture, weights restored separately (as Lightning does).
    torch.manual_seed(1)
    module2 = ToyModule()
    module2.policy.load_state_dict(module.policy.state_dict())
    algo2 = PackNet(prune_ratio=0.3)
    algo2.setup(module2)
    algo2.load_state_dict(loaded)
    algo2.setup(module2)
    assert algo2.pruned_tasks == [0, 1] and algo2.prune_ratio == 0.5
    assert all(torch.equal(algo2.owners()[n], o) for n, o in algo.owners().items())
    json.dumps({k: v for k, v in algo2.state_dict().items() if k != "owners"})
    for task in (0, 1):
        with algo.eval_context(task, module), algo2.eval_context(task, module2):
            inside, inside2 = _params(module), _params(module2)
            assert all(torch.equal(v, inside2[n]) for n, v in inside.items())
    with pytest.raises(ValueError, match="packnet"):
        algo2.load_state_dict({**loaded, "name": "er"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_ratio": 0.0}, "prune_ratio"),
        ({"prune_ratio": 1.0}, "prune_ratio"),
        ({"prune_ratio": -0.2}, "prune_ratio"),
        ({"prune_ratio": "half"}, "prune_ratio"),
        ({"finetune_steps": -1}, "finetune_steps"),
        ({"finetune_batch_size": 0}, "finetune_batch_size"),
        ({"finetune_lr": -1.0}, "finetune_lr"),
        ({"shared_params": "always"}, "shared_params"),
    ],
)
def test_bad_hyperparameters_are_one_sentence(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        PackNet(**kwargs)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.slow
def test_packnet_real_run_keeps_task0_weights_bit_identical(
    synthetic_dataset_factory, tmp_path: Path
) -> None:
    from test_gem import real_run

    run_dir = real_run(
        "packnet",
        synthetic_dataset_factory,
        tmp_path,
        [
            "algorithm.finetune_steps=2",
            "algorithm.finetune_batch_size=4",
            "trainer.reset_optimizer_per_task=false",  # Adam moments carried into task 1
            "eval.within_task_evals=1",  # evaluation inside a task goes through eval_context too
        ],
    )
    c0, c1 = (
        torch.load(run_dir / "checkpoints" / f"task_0{t}.ckpt", map_location="cpu", weights_only=True)
        for t in (0, 1)
    )
    a0, a1 = c0["cl_vla"]["algorithm"], c1["cl_vla"]["algorithm"]
    assert a0["pruned_tasks"] == [0] and a1["pruned_tasks"] == [0, 1] and a1["owners"]
    s0, s1 = c0["state_dict"], c1["state_dict"]
    for name, owner in a1["owners"].items():
        assert torch.equal(owner == 1, a0["owners"][name] == 1)
        mine = owner == 1
        assert torch.equal(s0[f"policy.{name}"][mine], s1[f"policy.{name}"][mine]), name
    shared = [k for k in s0 if k.startswith("policy.") and k[len("policy.") :] not in a1["owners"]]
    assert shared and all(torch.equal(s0[k], s1[k]) for k in shared)


def test_multiplier_snapshot_zeroes_and_restores_exactly_what_boolean_masks_would() -> None:
    from cl_vla.algorithms.packnet_masks import frozen_snapshot, restore_frozen, zero_frozen_grads

    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(6, 5, generator=gen), "v": torch.randn(7, generator=gen)}
    owners = {
        "w": torch.randint(0, 3, (6, 5), generator=gen, dtype=torch.uint8),
        "v": torch.zeros(7, dtype=torch.uint8),
    }
    shared = {"b": torch.randn(4, generator=gen)}
    before = {n: p.clone() for n, p in {**params, **shared}.items()}
    snap = frozen_snapshot(params, owners, shared)
    assert set(snap) == {"w", "b"}  # "v" has no owned element: nothing to hold
    every = {**params, **shared}
    for p in every.values():
        p.grad = torch.randn(p.shape, generator=gen)
        p.add_(torch.randn(p.shape, generator=gen))  # an optimizer step moved everything
    moved, grads = {n: p.clone() for n, p in every.items()}, {n: p.grad.clone() for n, p in every.items()}
    zero_frozen_grads(every, snap)
    restore_frozen(every, snap)
    frozen = owners["w"] != 0
    assert torch.equal(every["w"].grad, grads["w"].masked_fill(frozen, 0.0))
    assert torch.equal(every["w"], torch.where(frozen, before["w"], moved["w"]))
    assert torch.equal(every["v"], moved["v"]) and torch.equal(every["v"].grad, grads["v"])
    assert torch.equal(every["b"], before["b"]) and not every["b"].grad.any()
