"""TinyVLA: lerobot registration, save/load, real language conditioning, tokenizer determinism, masking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors

import cl_vla.policies  # registers "tiny_vla"
from cl_vla.policies.tiny_vla import TinyVLAConfig
from cl_vla.policies.tiny_vla.modeling_tiny_vla import TinyVLAPolicy
from cl_vla.policies.tiny_vla.text_encoder_tiny_vla import HashedTokenizer

STATE_DIM, ACTION_DIM, CHUNK = 8, 7, 10
CAMERAS = ("observation.images.image", "observation.images.wrist_image")
INSTRUCTION = "Pick up the black bowl and place it on the plate"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small tensors gain nothing from threads, and on a shared 2-core machine busy-waiting threads of
    concurrent jobs can slow training steps tenfold; one thread keeps these tests' time predictable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def libero_features(size: int = 64) -> tuple[dict[str, PolicyFeature], dict[str, PolicyFeature]]:
    inputs = {key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, size, size)) for key in CAMERAS}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    return inputs, {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}


def make_config(size: int = 64, **kwargs) -> TinyVLAConfig:
    inputs, outputs = libero_features(size)
    return make_policy_config(
        "tiny_vla", input_features=inputs, output_features=outputs, device="cpu", **kwargs
    )


def make_batch(batch_size: int, size: int = 64, tasks: list[str] | str | None = None) -> dict:
    batch = {key: torch.rand(batch_size, 3, size, size) for key in CAMERAS}
    batch["observation.state"] = torch.randn(batch_size, STATE_DIM)
    batch["action"] = torch.randn(batch_size, CHUNK, ACTION_DIM)
    batch["action_is_pad"] = torch.zeros(batch_size, CHUNK, dtype=torch.bool)
    batch["task"] = [INSTRUCTION] * batch_size if tasks is None else tasks
    return batch


def test_lerobot_factory_resolves_config_policy_and_processors():
    cfg = make_config()
    assert isinstance(cfg, TinyVLAConfig) and cfg.type == "tiny_vla"
    assert cfg.action_delta_indices == list(range(CHUNK))
    assert cfg.observation_delta_indices is None and cfg.reward_delta_indices is None
    assert get_policy_class("tiny_vla") is TinyVLAPolicy

    stats = {
        "observation.state": {"mean": torch.full((STATE_DIM,), 2.0), "std": torch.full((STATE_DIM,), 4.0)},
        "action": {"mean": torch.full((ACTION_DIM,), 1.0), "std": torch.full((ACTION_DIM,), 3.0)},
    }
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    policy = TinyVLAPolicy(cfg)
    n_params = sum(p.numel() for p in policy.parameters())
    assert 500_000 <= n_params <= 2_000_000

    # One unbatched observation, as an environment gives it, with a non-square camera image.
    frame = {key: torch.rand(3, 48, 40) for key in CAMERAS}
    frame["observation.state"] = torch.full((STATE_DIM,), 2.0)
    frame["task"] = INSTRUCTION
    processed = pre(frame)
    assert processed["task"] == [INSTRUCTION]
    assert torch.allclose(processed["observation.state"], torch.zeros(1, STATE_DIM))
    action = post(policy.select_action(processed))
    assert action.shape == (1, ACTION_DIM)
    assert len(policy._action_queue) == cfg.n_action_steps - 1


def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path: Path):
    torch.manual_seed(0)
    policy = TinyVLAPolicy(make_config(size=32, image_size=32, chunk_size=5, n_action_steps=3))
    batch = make_batch(4, size=32, tasks=["open the drawer", "close the drawer", "", "open the drawer"])
    batch["action"] = batch["action"][:, :5]
    expected = policy.predict_action_chunk(batch)

    policy.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["type"] == "tiny_vla"
    loaded = TinyVLAPolicy.from_pretrained(tmp_path)
    assert loaded.config.chunk_size == 5 and loaded.config.conv_channels == policy.config.conv_channels
    assert loaded.state_dict().keys() == policy.state_dict().keys()
    assert torch.equal(loaded.predict_action_chunk(batch), expected)


def test_instruction_alone_decides_the_action_sign():
    torch.manual_seed(0)
    # Tiny images and batch keep 200 steps at a few seconds on a shared 2-core CPU.
    cfg = make_config(size=16, image_size=16, dropout=0.0)
    policy = TinyVLAPolicy(cfg)
    instructions = ["push the block to the left", "push the block to the right"]
    batch = make_batch(4, size=16, tasks=instructions * 2)
    # Every sample sees the same images and state; only the instruction tells +1 from -1.
    for key in (*CAMERAS, "observation.state"):
        batch[key] = batch[key][:1].expand_as(batch[key]).contiguous()
    sign = torch.tensor([1.0, -1.0] * 2)
    batch["action"] = sign[:, None, None].expand(4, CHUNK, ACTION_DIM).contiguous()

    optimizer = cfg.get_optimizer_preset().build(policy.get_optim_params())
    policy.train()
    for _ in range(200):
        loss, info = policy(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # ~0.02 after 200 steps here; the 10x margin holds on any CPU (kernels differ in rounding only).
    assert info["l1_loss"] < 0.2

    probe = make_batch(2, size=16, tasks=instructions)
    for key in (*CAMERAS, "observation.state"):
        probe[key] = batch[key][:2]
    pred = policy.predict_action_chunk(probe)
    assert (pred[0] > 0).all() and (pred[1] < 0).all()


def test_unseen_empty_single_and_missing_instructions_do_not_crash():
    policy = TinyVLAPolicy(make_config(size=32, image_size=32))
    batch = make_batch(3, size=32, tasks=["", "a never seen instruction, with punctuation!", "   "])
    assert torch.isfinite(policy.predict_action_chunk(batch)).all()
    batch["task"] = "one instruction for the whole batch"
    assert policy.predict_action_chunk(batch).shape == (3, CHUNK, ACTION_DIM)
    del batch["task"]
    assert torch.isfinite(policy.predict_action_chunk(batch)).all()


def test_tokenizer_is_deterministic_across_processes():
    tokenizer = HashedTokenizer(vocab_buckets=4096, max_tokens=32, use_bigrams=True)
    ids = tokenizer.encode(INSTRUCTION)
    assert len(ids) == 1 + 11 + 10  # CLS, 11 words, 10 bigrams
    # Pinned ids: a change here silently scrambles every saved checkpoint's text embeddings.
    assert ids[:6] == (HashedTokenizer.CLS_ID, 14, 926, 903, 1613, 1376)
    assert tokenizer.encode(INSTRUCTION.upper()) == ids
    assert tokenizer.encode("") == (HashedTokenizer.CLS_ID,)
    assert all(2 <= i < 4096 for i in ids[1:])

    # A fresh interpreter with another string-hash salt must produce the same ids.
    src = str(Path(cl_vla.policies.__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONHASHSEED": "12345",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    code = (
        "from cl_vla.policies.tiny_vla.text_encoder_tiny_vla import HashedTokenizer\n"
        f"print(list(HashedTokenizer(4096, 32, True).encode({INSTRUCTION!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == list(ids)


def test_padded_steps_do_not_contribute_to_the_loss():
    torch.manual_seed(0)
    policy = TinyVLAPolicy(make_config(size=32, image_size=32, dropout=0.0))
    batch = make_batch(4, size=32)
    batch["action_is_pad"][:, 6:] = True
    batch["action_is_pad"][3] = True  # a fully padded sample must not produce NaN
    loss, info = policy(batch)

    changed = dict(batch, action=batch["action"].clone())
    changed["action"][batch["action_is_pad"]] = 1e6
    loss_changed, _ = policy(changed)
    assert torch.isfinite(loss) and torch.allclose(loss, loss_changed)
    assert info["l1_loss"] == pytest.approx(loss.item())

    pred = policy.compute_outputs(batch)["action_pred"]
    valid = ~batch["action_is_pad"]
    expected = (pred - batch["action"]).abs()[valid].mean()
    assert torch.allclose(loss, expected)
    per_sample, _ = policy(batch, reduction="none")
    assert per_sample.shape == (4,) and per_sample[3] == 0

    pred.retain_grad()
    policy.action_loss(pred, batch["action"], batch["action_is_pad"]).backward()
    assert (pred.grad[batch["action_is_pad"]] == 0).all()


def test_missing_frozen_text_encoder_path_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(ValueError, match="no_such_encoder"):
        TinyVLAPolicy(make_config(text_encoder=f"frozen:{missing}"))
    with pytest.raises(ValueError, match="text_encoder"):
        make_config(text_encoder="bert")


def test_ewc_per_sample_fisher_traces_tiny_vla_with_vmap():
    """tiny_vla's forward stays traceable by torch.func, so EWC's vectorized Fisher is used on it."""
    import warnings

    from torch.utils.data import DataLoader

    from cl_vla.algorithms.ewc import EWC

    torch.manual_seed(0)
    policy = TinyVLAPolicy(make_config(size=16, image_size=16, dropout=0.0))
    batch = make_batch(6, size=16, tasks=[INSTRUCTION] * 3 + ["open the drawer"] * 3)
    frames = [{k: v[i] for k, v in batch.items()} for i in range(6)]

    def fisher(vmap_ok: bool) -> dict[str, torch.Tensor]:
        algo = EWC(fisher_samples=6, fisher_batch_size=3)
        algo._vmap_ok = vmap_ok
        return algo.compute_fisher(policy, policy.forward, frames, lambda ds, **kw: DataLoader(ds, **kw))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the loop would warn
        vectorized = fisher(True)
    looped = fisher(False)
    assert vectorized.keys() == looped.keys() and len(vectorized) > 5
    for name in looped:
        torch.testing.assert_close(vectorized[name], looped[name], rtol=1e-4, atol=1e-9)
