"""Per-task LoRA (TAIL) and plain LoRA fine-tuning through peft, on a small tiny_vla."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_policy_config

import cl_vla.policies  # noqa: F401  (registers tiny_vla)
from cl_vla.algorithms.base import TaskContext
from cl_vla.algorithms.lora import PerTaskLoRA
from cl_vla.policies.lora import (
    activate_adapter,
    apply_model_lora,
    count_parameters,
    lora_layers,
    lora_parameters,
    resolve_target_modules,
)
from cl_vla.policies.tiny_vla.modeling_tiny_vla import TinyVLAPolicy
from conftest import train_in_process

SIZE, STATE_DIM, ACTION_DIM, CHUNK = 16, 8, 7, 10


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny tensors gain nothing from threads; on a shared machine they only add contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_policy(seed: int = 0) -> TinyVLAPolicy:
    inputs = {"observation.images.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, SIZE, SIZE))}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    cfg = make_policy_config(
        "tiny_vla",
        input_features=inputs,
        output_features=outputs,
        device="cpu",
        image_size=SIZE,
        conv_channels=[8, 16, 16],
        feature_dim=32,
        hidden_dim=64,
        text_dim=32,
        vocab_buckets=256,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    return TinyVLAPolicy(cfg)


def make_batch(task: str = "pick up the bowl", n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "observation.images.image": torch.rand(n, 3, SIZE, SIZE, generator=g),
        "observation.state": torch.randn(n, STATE_DIM, generator=g),
        "action": torch.randn(n, CHUNK, ACTION_DIM, generator=g),
        "action_is_pad": torch.zeros(n, CHUNK, dtype=torch.bool),
        "task": [task] * n,
    }


def train(policy: torch.nn.Module, steps: int = 3, lr: float = 0.05) -> None:
    # What CLPolicyModule does at every task's fit: an optimizer over the parameters that require grad.
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    for _ in range(steps):
        loss, _ = policy(make_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def predict(policy: torch.nn.Module) -> torch.Tensor:
    policy.eval()
    return policy.compute_outputs(make_batch(seed=7))["action_pred"]


def start(algo: PerTaskLoRA, module: SimpleNamespace, t: int) -> None:
    algo.on_task_start(t, TaskContext(task_id=t, task_name=f"t{t}", num_tasks=3, module=module))


def snapshot(policy: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    names = {n for n, _ in lora_parameters(policy)}
    return {n: p.detach().clone() for n, p in policy.named_parameters() if (n in names) == lora}


def trained_two_tasks() -> tuple[PerTaskLoRA, SimpleNamespace]:
    policy = make_policy()
    module = SimpleNamespace(policy=policy)
    algo = PerTaskLoRA(r=4, alpha=8)
    algo.setup(module)
    for t in range(2):
        start(algo, module, t)
        train(policy)
    return algo, module


def test_earlier_adapters_and_base_stay_bit_identical():
    policy = make_policy()
    module = SimpleNamespace(policy=policy)
    algo = PerTaskLoRA(r=4, alpha=8)
    algo.setup(module)
    base0 = snapshot(policy, lora=False)
    start(algo, module, 0)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(policy, "task_0")} and trainable
    train(policy)
    after0 = snapshot(policy, lora=True)

    start(algo, module, 1)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n, _ in lora_parameters(policy, "task_1")
    }
    train(policy)
    after1 = snapshot(policy, lora=True)
    base1 = snapshot(policy, lora=False)
    # peft renames a wrapped layer's weight to <layer>.base_layer.weight: compare by value in order.
    assert len(base0) == len(base1)
    assert all(torch.equal(a, b) for a, b in zip(base0.values(), base1.values(), strict=True))
    assert all(torch.equal(after1[n], v) for n, v in after0.items())  # task_0 untouched
    changed = [n for n in after1 if ".task_1." in n and "lora_B" in n and after1[n].abs().sum() > 0]
    assert changed  # task_1 did learn
    assert algo.tasks_with_adapter == [0, 1]


def test_eval_context_selects_the_tasks_adapter():
    policy = make_policy()
    base_out = predict(policy)
    module = SimpleNamespace(policy=policy)
    algo = PerTaskLoRA(r=4, alpha=8)
    algo.setup(module)
    for t in range(2):
        start(algo, module, t)
        train(policy)
    flags = [p.requires_grad for p in policy.parameters()]

    outs = {}
    for j in (0, 1, 2):
        with algo.eval_context(j, module):
            outs[j] = predict(policy)
    assert not torch.allclose(outs[0], outs[1])
    assert torch.equal(outs[2], base_out)  # unseen task: adapters disabled, the untouched base
    for j in (0, 1):
        for layer in lora_layers(policy):  # peft's own switch, by hand
            layer.enable_adapters(True)
            layer.set_adapter(f"task_{j}")
        assert torch.equal(predict(policy), outs[j])
    # The training state (task_1 active and trainable) is back after each context.
    activate_adapter(policy, "task_1")
    with algo.eval_context(0, module):
        pass
    assert all(
        layer.active_adapters == ["task_1"] and not layer.disable_adapters for layer in lora_layers(policy)
    )
    assert [p.requires_grad for p in policy.parameters()] == flags


def test_state_round_trips_through_weights_only_load():
    algo, module = trained_two_tasks()
    buf = io.BytesIO()
    torch.save(algo.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["tasks"] == [0, 1] and state["current"] == 1
    json.dumps({k: v for k, v in state.items() if k != "adapters"})  # metadata is JSON-compatible

    # A resumed run: fresh policy (other init), restored state, setup, then Lightning's strict load.
    policy2 = make_policy(seed=123)
    module2 = SimpleNamespace(policy=policy2)
    algo2 = PerTaskLoRA(r=4, alpha=8)
    algo2.setup(module2)
    algo2.load_state_dict(state)
    rng = torch.get_rng_state()
    algo2.setup(module2)
    assert torch.equal(torch.get_rng_state(), rng)  # re-injection does not shift the random stream
    assert list(policy2.state_dict()) == list(module.policy.state_dict())
    for n, t in state["adapters"]["task_0"].items():
        assert torch.equal(dict(policy2.named_parameters())[n], t)
    policy2.load_state_dict(module.policy.state_dict(), strict=True)
    for j in (0, 1, 2):
        with algo.eval_context(j, module), algo2.eval_context(j, module2):
            assert torch.equal(predict(module.policy), predict(policy2))
    trainable = {n for n, p in policy2.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(policy2, "task_1")}  # mid-task resume trains task_1
    assert algo2.state_dict()["config"] == state["config"]

    with pytest.raises(ValueError, match="r=16"):
        PerTaskLoRA(r=16, alpha=8).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"r": 0}, "r=0"),
        ({"r": -2}, "r=-2"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
    ],
)
def test_bad_values_are_rejected(kwargs, value):
    with pytest.raises(ValueError, match=value) as e:
        PerTaskLoRA(**kwargs)
    assert "\n" not in str(e.value) and str(e.value).endswith(".")  # one sentence


def test_targets_matching_nothing_are_rejected():
    policy = make_policy()
    module = SimpleNamespace(policy=policy)
    algo = PerTaskLoRA(target_modules=["no_such_layer"])
    algo.setup(module)
    with pytest.raises(ValueError, match="no_such_layer"):
        start(algo, module, 0)
    # Layers PyTorch reads weights from directly are never adapted (LoRA there would be bypassed).
    with pytest.raises(ValueError, match="linear1"):
        resolve_target_modules(policy, ["linear1", r".*self_attn\.out_proj"])


def test_plain_lora_leaves_only_adapter_params_trainable():
    policy = make_policy()
    assert apply_model_lora(policy, None) is None
    settings = apply_model_lora(policy, {"r": 4, "alpha": 8, "target_modules": ["trunk.0", "action_head"]})
    assert settings.resolved_targets == ["model.trunk.0", "model.action_head"]
    lora = dict(lora_parameters(policy))
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == set(lora)
    trainable, total = count_parameters(policy)
    assert trainable == sum(p.numel() for p in lora.values()) and 0 < trainable < total / 10
    train(policy, steps=1)

    everything = make_policy()
    settings = apply_model_lora(everything, {"r": 2})
    assert "model.vision.stem.0" in settings.resolved_targets  # Conv2d layers too
    assert not any("self_attn" in n or "linear" in n for n in settings.resolved_targets)
    with pytest.raises(ValueError, match="rank"):
        apply_model_lora(make_policy(), {"rank": 4})


@pytest.mark.slow
def test_lora_per_task_real_run(synthetic_dataset_factory, tmp_path):
    from cl_vla.data.task_sequences import get_task_sequence

    spec = {"episodes_per_task": 3, "frames_per_episode": 8, "image_size": 16}
    tasks = list(get_task_sequence("libero_spatial").tasks[:2])
    root, repo_id, _ = synthetic_dataset_factory(tasks, **spec)
    run_dir = tmp_path / "run"
    results = train_in_process(
        [
            "algorithm=lora_per_task",
            "algorithm.r=4",
            "task_sequence=custom",
            "task_sequence.name=lora2",
            "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
            f"data.root={root}",
            f"data.repo_id={repo_id}",
            *(f"data.synthetic.{k}={v}" for k, v in spec.items()),
            "trainer.progress_bar=false",
            "data.num_workers=0",
            "data.batch_size=8",
            "model.image_size=16",
            "trainer.warmup_steps=1",
            "continual_learning.steps_per_task=5",
            "logger=none",
        ],
        run_dir,
    )
    assert results["extra"]["algorithm"] == "lora_per_task"
    assert results["extra"]["algorithm_state_bytes"] > 0  # the adapters are the algorithm's memory
