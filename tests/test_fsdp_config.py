"""trainer=fsdp's settings that cannot work are refused in one sentence before any data or model."""

from __future__ import annotations

import pytest

from cl_vla.errors import ConfigError
from conftest import compose_config


def _validate(*overrides: str):
    from cl_vla.cli import validate_config

    return validate_config(compose_config("experiment=smoke", *overrides))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            ["trainer=fsdp_cpu", "algorithm=packnet"],
            "algorithm=packnet does not run under trainer.strategy=fsdp",
        ),
        (["trainer=fsdp_cpu", "algorithm=lora_per_task"], "algorithm=lora_per_task does not run under"),
        (["trainer=fsdp_cpu", "trainer.fsdp_mixed_precision=bf16"], "fsdp_mixed_precision=bf16 needs GPUs"),
        (["trainer=fsdp_cpu", "trainer.fsdp_mixed_precision=fp8"], "choose 'none' or 'bf16'"),
        (["trainer=cpu", "trainer.fsdp_mixed_precision=bf16"], "applies only under trainer.strategy=fsdp"),
        (["trainer=fsdp_cpu", "trainer.devices=[0,1]"], "is not allowed under trainer.strategy=fsdp"),
        (
            ["trainer=fsdp_cpu", "experiment=metaworld_default", "algorithm=er"],
            "eval=sim does not run under trainer.strategy=fsdp",
        ),
    ],
)
def test_fsdp_refusals_are_one_sentence(overrides, says):
    with pytest.raises(ConfigError) as e:
        _validate(*overrides)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "algo", ["sequential", "er", "derpp", "agem", "gem", "mir", "ewc", "ewc_online", "si"]
)
def test_fsdp_accepts_every_sharded_algorithm(algo):
    cfg = _validate("trainer=fsdp_cpu", f"algorithm={algo}")
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.devices == 2
