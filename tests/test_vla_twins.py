"""The tiny twins of the hub VLAs (SmolVLA, pi0, pi0.5): lerobot's own classes and processors built
offline, saved and loaded back through ``model.pretrained_path``, exported after every task in
lerobot's format, and refusing bad input in one sentence.

Every algorithm with the twins (hook reachability, exact resume) is in ``test_every_algorithm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cl_vla.errors import ConfigError, DataError
from conftest import in_process_overrides, last_line

TWINS = ("smolvla_tiny", "pi0_tiny", "pi05_tiny", "groot_tiny")


def _compose(synthetic_libero, tmp_path: Path, model: str, *extra: str):
    from cl_vla.training.in_process import compose_run

    root, repo_id, _ = synthetic_libero
    overrides = in_process_overrides("sequential", root, repo_id, "twin2", 2, model=model)
    return compose_run([*overrides, *extra], tmp_path / "out")


def _first_batch(data, policy_cfg, stats):
    """One preprocessed training batch of 2 frames, as the loop feeds the policy."""
    from torch.utils.data import DataLoader

    from cl_vla.policies.factory import make_processors

    pre, _ = make_processors(policy_cfg, stats)
    raw = next(iter(DataLoader(data.train_dataset(0), batch_size=2, shuffle=False)))
    return pre, raw


@pytest.mark.parametrize("model", TWINS)
def test_twin_builds_lerobot_classes_offline_and_trains_a_step(model, synthetic_libero, tmp_path):
    from cl_vla.data.stats import select_stats
    from cl_vla.policies.factory import make_policy

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, model)
    policy = make_policy(policy_cfg, data.dataset.meta)
    # lerobot's own policy class, not a stand-in.
    expected = {"smolvla": "SmolVLAPolicy", "pi0": "PI0Policy", "pi05": "PI05Policy", "groot": "GrootPolicy"}[
        policy_cfg.type
    ]
    assert type(policy).__name__ == expected and type(policy).__module__.startswith("lerobot.policies.")
    total = sum(p.numel() for p in policy.parameters())
    assert total < 1_500_000, f"{model} twin has {total} parameters; it must stay tiny"
    stats = select_stats("dataset", data.dataset.meta, [s.train_episodes for s in data.streams], 0)
    pre, raw = _first_batch(data, policy_cfg, stats)
    loss, _ = policy.forward(pre(dict(raw)))
    loss.backward()
    head = [p for n, p in policy.named_parameters() if "action_out_proj" in n or "action_decoder" in n]
    assert torch.isfinite(loss) and head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


def test_twin_building_restores_lerobot(synthetic_libero, tmp_path):
    """The pi0 twin's size patches exist only while it is built: lerobot is left as it was."""
    import lerobot.policies.pi0.modeling_pi0 as modeling
    import lerobot.policies.pi0.processor_pi0 as processor

    before = (modeling.get_gemma_config, modeling.PiGemmaForCausalLM, processor.TokenizerProcessorStep)
    from cl_vla.policies.factory import make_policy

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, "pi0_tiny")
    make_policy(policy_cfg, data.dataset.meta)
    assert (
        modeling.get_gemma_config,
        modeling.PiGemmaForCausalLM,
        processor.TokenizerProcessorStep,
    ) == before
    assert modeling.get_gemma_config("gemma_300m").width == 1024


@pytest.mark.parametrize("model", ["smolvla_tiny", "pi0_tiny", "groot_tiny"])
def test_per_task_export_loads_with_from_pretrained_and_acts_the_same(model, synthetic_libero, tmp_path):
    """After a 2-task run, ``export/task_01`` loads with lerobot's ``from_pretrained`` (policy and
    processors) and predicts the same actions as the run's final checkpoint."""
    from cl_vla.data.stats import unflatten_stats
    from cl_vla.policies.factory import load_policy, make_policy, make_processors
    from cl_vla.training.in_process import run_in_process

    root, repo_id, _ = synthetic_libero
    out = tmp_path / "run"
    run_in_process(in_process_overrides("er", root, repo_id, "export2", 2, model=model), out)
    export = out / "export" / "task_01"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert (export / "policy_preprocessor.json").is_file() and (
        export / "policy_postprocessor.json"
    ).is_file()

    if model == "smolvla_tiny":  # lerobot alone, no cl_vla code involved in the load
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import make_pre_post_processors
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

        loaded = SmolVLAPolicy.from_pretrained(str(export)).eval()
        pre_l, post_l = make_pre_post_processors(
            PreTrainedConfig.from_pretrained(str(export)), pretrained_path=str(export)
        )
    else:  # pi0's twin needs its sizes while lerobot rebuilds it (cl_vla_twin.json beside the export);
        # GR00T's export names its generated base checkpoint and backbone folders, and loads as it is
        loaded, pre_l, post_l = load_policy(export)

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, model)
    ckpt = torch.load(out / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)
    ref = make_policy(policy_cfg, data.dataset.meta).eval()
    ref.load_state_dict({k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items()})
    pre_r, post_r = make_processors(policy_cfg, unflatten_stats(ckpt["cl_vla"]["normalization"]))

    item = data.train_dataset(0)[0]
    obs = {k: v for k, v in item.items() if k.startswith("observation.") or k == "task"}
    actions = []
    for policy, pre, post in ((loaded, pre_l, post_l), (ref, pre_r, post_r)):
        torch.manual_seed(0)
        with torch.no_grad():
            actions.append(post(policy.predict_action_chunk(pre(dict(obs)))))
    assert actions[0].shape[-1] == 7
    torch.testing.assert_close(actions[0], actions[1], rtol=0, atol=1e-5)


def test_pretrained_path_loads_a_saved_twin_without_hub(synthetic_libero, tmp_path):
    """``model.pretrained_path=<folder written by save_pretrained>``: the config comes from the folder
    and the weights are the saved ones, with no hub call (HF_HUB_OFFLINE=1 in the tests)."""
    from cl_vla.policies.factory import make_policy, save_policy

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, "smolvla_tiny")
    saved = make_policy(policy_cfg, data.dataset.meta)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.01)  # weights that a fresh random build would not give
    folder = save_policy(tmp_path / "saved", saved, None, None)

    # model=smolvla (the real model's group) with the twin's folder: everything comes from the folder.
    _, _, data2, cfg2 = _compose(synthetic_libero, tmp_path, "smolvla", f"model.pretrained_path={folder}")
    assert cfg2.pretrained_path == str(folder) and cfg2.vlm_model_name == saved.config.vlm_model_name
    loaded = make_policy(cfg2, data2.dataset.meta)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---- bad input, one sentence each -------------------------------------------------------------------


def test_pretrained_folder_without_config_is_one_sentence(synthetic_libero, tmp_path):
    empty = tmp_path / "weights_only"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is a folder without config\.json") as info:
        _compose(synthetic_libero, tmp_path, "smolvla_tiny", f"model.pretrained_path={empty}")
    assert "\n" not in str(info.value)


def test_truncated_pretrained_weights_are_named_in_one_sentence(synthetic_libero, tmp_path):
    from cl_vla.policies.factory import make_policy, save_policy

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, "smolvla_tiny")
    folder = save_policy(tmp_path / "saved", make_policy(policy_cfg, data.dataset.meta), None, None)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _, _, data2, cfg2 = _compose(
        synthetic_libero, tmp_path, "smolvla_tiny", f"model.pretrained_path={folder}"
    )
    with pytest.raises(ConfigError) as info:
        make_policy(cfg2, data2.dataset.meta)
    msg = str(info.value)
    assert msg.startswith(f"model.pretrained_path: '{weights}' cannot be read (") and "\n" not in msg
    assert "truncated or damaged" in msg


def test_state_or_action_wider_than_max_dims_is_one_sentence(synthetic_libero, tmp_path):
    with pytest.raises(DataError, match=r"8-d 'observation\.state', wider than .*max_state_dim=4"):
        _compose(synthetic_libero, tmp_path, "pi0_tiny", "model.max_state_dim=4")
    with pytest.raises(DataError, match=r"7-d 'action', wider than .*max_action_dim=6"):
        _compose(synthetic_libero, tmp_path, "smolvla_tiny", "model.max_action_dim=6")


def test_dataset_lacking_a_camera_the_model_expects_is_one_sentence(synthetic_libero, tmp_path):
    from lerobot.configs.types import FeatureType, PolicyFeature

    from cl_vla.policies.factory import make_policy, save_policy
    from cl_vla.policies.vla_checks import check_vla_features

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, "smolvla_tiny")
    policy_cfg.input_features["observation.images.agentview"] = PolicyFeature(FeatureType.VISUAL, (3, 32, 32))
    folder = save_policy(tmp_path / "three_cams", make_policy(policy_cfg, data.dataset.meta), None, None)
    with pytest.raises(DataError, match=r"lacks camera 'observation\.images\.agentview'"):
        _compose(synthetic_libero, tmp_path, "smolvla_tiny", f"model.pretrained_path={folder}")

    no_camera = {k: f for k, f in policy_cfg.input_features.items() if f.type is not FeatureType.VISUAL}
    with pytest.raises(DataError, match=r"has no camera .* needs at least one"):
        check_vla_features(policy_cfg, no_camera, "no_cams", saved=False)
    no_state = {k: f for k, f in policy_cfg.input_features.items() if k != "observation.state"}
    with pytest.raises(DataError, match=r"has no 'observation\.state'"):
        check_vla_features(policy_cfg, no_state, "no_state", saved=False)


def test_tokenizer_not_found_offline_stops_train_py_with_one_sentence(synthetic_libero, tmp_path, capsys):
    """The real pi0 (no twin) offline: its hub tokenizer is absent, so train.py's body refuses before
    building a 4 B-parameter model, with exit code 2 and one line."""
    from hydra import compose, initialize_config_dir

    from cl_vla.cli import run_main
    from cl_vla.config.schema import register_configs
    from conftest import CONF_DIR

    root, repo_id, _ = synthetic_libero
    overrides = in_process_overrides("er", root, repo_id, "tok2", 2, model="pi0")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*overrides, "model.pretrained_path=null", f"output_dir={tmp_path}"]
        )
    with pytest.raises(SystemExit) as exit_info:
        run_main(cfg)
    assert exit_info.value.code == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("error: ") and "\n" not in line
    assert "needs the tokenizer 'google/paligemma-3b-pt-224'" in line and "model=pi0_tiny" in line


def test_twin_spec_is_saved_with_the_export(synthetic_libero, tmp_path):
    from cl_vla.policies.factory import make_policy, save_policy
    from cl_vla.policies.twins import TWIN_FILE

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, "pi05_tiny")
    folder = save_policy(tmp_path / "pi05", make_policy(policy_cfg, data.dataset.meta), None, None)
    spec = json.loads((folder / TWIN_FILE).read_text())
    assert spec["type"] == "pi05" and spec["spec"]["width"] == 32


def _state_param_names(state) -> set[str]:
    """Parameter names that key tensors anywhere in an algorithm's saved state."""
    names: set[str] = set()
    stack = [state]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            for k, v in x.items():
                if isinstance(v, torch.Tensor) and "." in str(k):
                    names.add(str(k))
                else:
                    stack.append(v)
    return names


@pytest.mark.parametrize(
    ("algo", "extra", "frozen", "trained"),
    [
        # SmolVLA's defaults: the whole VLM frozen (train_expert_only), only the action expert trains.
        ("ewc", (), ("model.vlm_with_expert.vlm.",), "model.vlm_with_expert.lm_expert."),
        ("si", (), ("model.vlm_with_expert.vlm.",), "model.vlm_with_expert.lm_expert."),
        ("packnet", (), ("model.vlm_with_expert.vlm.",), "model.vlm_with_expert.lm_expert."),
        # The VLM's text layers train too, the vision encoder stays frozen (freeze_vision_encoder).
        ("ewc", ("model.train_expert_only=false",), (".vision_model.",), "model.vlm_with_expert.vlm."),
    ],
)
def test_cl_state_covers_only_parameters_that_train_with_the_policy_recipe(
    algo, extra, frozen, trained, synthetic_libero, tmp_path
):
    from cl_vla.training.in_process import run_in_process

    root, repo_id, _ = synthetic_libero
    out = tmp_path / "run"
    run_in_process(
        [*in_process_overrides(algo, root, repo_id, "state2", 2, model="smolvla_tiny"), *extra], out
    )
    ckpt = torch.load(out / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)
    names = _state_param_names(ckpt["cl_vla"]["algorithm"])
    assert names, f"{algo} saved no per-parameter state"
    assert not [n for n in names if any(f in n for f in frozen)], f"{algo} keeps state for frozen parameters"
    assert any(trained in n for n in names)
    # SmolVLA's own optimizer preset (lerobot's get_optimizer_preset), not the trainer group's AdamW.
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.95) and group["weight_decay"] == pytest.approx(1e-10)


# ---- memory plan ------------------------------------------------------------------------------------------


def test_memory_plan_counts_the_real_models_on_the_meta_device():
    """Full-size parameter counts without weights or hub (SmolVLA's backbone config reproduced in code)."""
    from cl_vla.training.memory_plan import GB, Plan, count_hub_model

    smolvla = count_hub_model("smolvla")
    assert 0.43e9 < smolvla.total < 0.47e9 and smolvla.trainable < 0.25 * smolvla.total  # expert only
    pi0 = count_hub_model("pi0")
    assert 3.2e9 < pi0.total < 4.1e9 and pi0.trainable == pi0.total  # lerobot's pi0 trains everything
    ewc = Plan(pi0, "ewc", 10)
    assert ewc.state_bytes == 2 * 4 * pi0.trainable * 10  # Fisher + anchor, fp32, per task
    assert Plan(pi0, "ewc_online", 10).state_bytes == ewc.state_bytes / 10
    assert ewc.fit_option(80 * GB) == "train_expert_only"  # 300 GB of Fisher/anchors as configured
    # FSDP over 8 GPUs: 1/8 of weights, gradients, moments and Fisher/anchors on each, nothing changed.
    assert ewc.sharded(8).per_gpu_bytes == pytest.approx(ewc.total_bytes / 8)
    assert ewc.fit_option(80 * GB, gpus=8) == "FSDP x 8"
    gem = Plan(pi0, "gem", 10, {"memory_per_task": 256})
    refs = 8 * 10 * 256  # dataset references stay whole on every rank
    assert gem.sharded(8).per_gpu_bytes == pytest.approx((gem.total_bytes - refs) / 8 + refs)
    # PackNet is not sharded yet: it is never offered FSDP.
    assert Plan(pi0, "packnet", 10).fit_option(60 * GB, gpus=8) == "train_expert_only"
    # State precision and place: bf16 halves what they apply to (SI's running omega stays fp32).
    online = Plan(pi0, "ewc_online", 10)
    assert online.placed(dtype="bfloat16").state_bytes == online.state_bytes / 2
    assert online.fit_option(80 * GB) == "algorithm.state_dtype=bfloat16"  # 90 GB -> 75 GB
    si = Plan(pi0, "si", 10).placed(dtype="bfloat16")
    assert si.state_bytes == 4 * pi0.trainable + 3 * 2 * pi0.trainable
    # Host state: what stays on the device is what one step brings over, the rest is in host memory.
    host = Plan(pi0, "ewc", 10).placed(device="cpu")
    assert host.host_state_bytes == ewc.state_bytes and host.device_state_bytes == 3 * 4 * pi0.trainable
    assert Plan(count_hub_model("groot"), "ewc", 10).fit_option(80 * GB) == "algorithm.state_device=cpu"


def test_memory_plan_refuses_before_the_first_step(synthetic_libero, tmp_path, monkeypatch):
    import cl_vla.training.memory_plan as mp
    from cl_vla.training.in_process import run_in_process

    monkeypatch.setattr(mp, "device_capacity", lambda accelerator: ("cuda", 1024.0**2))  # a 1 MB GPU
    root, repo_id, _ = synthetic_libero
    out = tmp_path / "run"
    with pytest.raises(
        mp.PlanDoesNotFitError, match=r"algorithm=ewc on smolvla over 2 tasks needs at least"
    ) as e:
        run_in_process(in_process_overrides("ewc", root, repo_id, "plan2", 2, model="smolvla_tiny"), out)
    assert "\n" not in str(e.value) and "1.0 MB of the cuda device" in str(e.value)
    assert not (out / "checkpoints").exists()  # refused before training started


def test_memory_plan_command_prints_without_training(capsys):
    from cl_vla.training.memory_plan import main

    main(["model=pi0", "algorithm=gem", "task_sequence=libero_spatial"])
    text = capsys.readouterr().out
    assert "memory plan: pi0" in text and "10 tasks" in text and "option algorithm=agem" in text


def test_bf16_mixed_precision_keeps_cl_state_in_fp32(synthetic_libero, tmp_path):
    """``trainer=gpu`` trains VLAs in bf16-mixed; the same precision on CPU: the policy's weights, the
    optimizer and EWC's Fisher and anchors stay fp32 (only autocast matmuls run in bf16)."""
    from hydra import compose, initialize_config_dir

    from cl_vla.config.schema import register_configs
    from cl_vla.training.in_process import run_in_process
    from conftest import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        gpu_cfg = compose("config", overrides=["trainer=gpu", "model=smolvla_tiny", "output_dir=."])
    assert gpu_cfg.trainer.precision == "bf16-mixed"
    root, repo_id, _ = synthetic_libero
    out = tmp_path / "run"
    overrides = in_process_overrides("ewc", root, repo_id, "bf16", 2, model="smolvla_tiny")
    results, _, _ = run_in_process([*overrides, "trainer.precision=bf16-mixed"], out)
    assert torch.isfinite(torch.as_tensor(results["matrix"])).all()
    ckpt = torch.load(out / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["cl_vla"]["algorithm"]
    tensors = [t for part in ("importance", "anchor") for d in state[part].values() for t in d.values()]
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("model", "blocks"),
    [
        ("tiny_vla", {"TransformerEncoderLayer", "FiLMConvEncoder"}),
        # lerobot runs these VLAs' decoder layers piece by piece: their MLPs are the units.
        ("smolvla_tiny", {"LlamaMLP", "SmolVLMEncoderLayer"}),
        ("pi0_tiny", {"GemmaMLP", "SiglipEncoderLayer"}),
        ("pi05_tiny", {"GemmaMLP", "SiglipEncoderLayer"}),
        ("groot_tiny", {"BasicTransformerBlock", "Qwen3VLVisionBlock", "Qwen3VLTextDecoderLayer"}),
    ],
)
def test_fsdp_units_are_the_vla_blocks(model, blocks, synthetic_libero, tmp_path):
    """trainer=fsdp shards each transformer block of lerobot's own classes as one unit."""
    from cl_vla.policies.factory import make_policy
    from cl_vla.training.fsdp import shard_units

    _, _, data, policy_cfg = _compose(synthetic_libero, tmp_path, model)
    policy = make_policy(policy_cfg, data.dataset.meta)
    modules = dict(policy.named_modules())
    units = shard_units(policy)
    assert {type(modules[u]).__name__ for u in units} == blocks
    assert not any(u.startswith(f"{v}.") for u in units for v in units), "a unit nested in another"
