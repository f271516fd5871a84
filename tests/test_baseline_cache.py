"""The untrained row under eval=sim is simulated once per setting: what its key covers, and reuse."""

from __future__ import annotations

import torch

from cl_vla.algorithms import PackNet, ReplayBuffer, Sequential
from cl_vla.evaluation.baseline_cache import baseline_key, baseline_row, cached_row
from conftest import compose_config

SIM = ("experiment=metaworld_default",)
STATS = {"observation.state": {"mean": torch.zeros(3), "std": torch.ones(3)}}


def _policy(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def test_the_key_covers_weights_statistics_and_settings_but_not_processes():
    cfg = compose_config(*SIM)
    key = baseline_key(cfg, _policy(), STATS, Sequential())
    assert key == baseline_key(compose_config(*SIM), _policy(), STATS, Sequential())
    # Worker processes, videos and other rows' settings cannot change the row's numbers.
    assert key == baseline_key(
        compose_config(*SIM, "eval.num_workers=1", "eval.videos=2"), _policy(), STATS, Sequential()
    )
    # Algorithms that evaluate the policy as it is share one row; a masking one does not.
    assert key == baseline_key(cfg, _policy(), STATS, ReplayBuffer())
    assert key != baseline_key(cfg, _policy(), STATS, PackNet())
    assert key != baseline_key(cfg, _policy(seed=1), STATS, Sequential())
    other = {"observation.state": {"mean": torch.zeros(3), "std": 2 * torch.ones(3)}}
    assert key != baseline_key(cfg, _policy(), other, Sequential())
    assert key != baseline_key(compose_config(*SIM, "eval.episodes=3"), _policy(), STATS, Sequential())
    assert key != baseline_key(compose_config(*SIM, "eval.seed=7"), _policy(), STATS, Sequential())
    assert key != baseline_key(compose_config(*SIM, "model.image_size=32"), _policy(), STATS, Sequential())


def test_a_row_is_simulated_once_then_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_VLA_CACHE", str(tmp_path))
    calls = []

    def simulate() -> list[float]:
        calls.append(1)
        return [0.1, 0.0, 0.3]

    assert baseline_row("k", 3, simulate) == ([0.1, 0.0, 0.3], False)
    assert baseline_row("k", 3, simulate) == ([0.1, 0.0, 0.3], True)
    assert len(calls) == 1
    # Another sequence length, or one process without the row (DDP), simulates again.
    assert cached_row("k", 4) is None
    assert baseline_row("k", 3, simulate, agree=lambda have: False, write=False) == ([0.1, 0.0, 0.3], False)
    assert len(calls) == 2
    (tmp_path / "baseline_rows" / "k.json").write_text("{not json")
    assert cached_row("k", 3) is None
