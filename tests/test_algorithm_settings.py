"""An experiment's own settings per algorithm (conf/algorithm_settings/<experiment>/<algorithm>.yaml):
merged into `algorithm` only under that experiment, overridden by the command line, and naming only keys
the algorithm has (the `algorithm` group is an open mapping, so a misspelt key would pass silently)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config

SETTINGS = sorted((CONF_DIR / "algorithm_settings").glob("*/*.yaml"))


def test_settings_apply_under_their_experiment_only_and_the_command_line_wins():
    cfg = compose_config("experiment=metaworld_cw", "algorithm=lora_per_task")
    assert cfg.algorithm.train_base_on_first_task is True
    assert compose_config("algorithm=lora_per_task").algorithm.train_base_on_first_task is False
    cfg = compose_config(
        "experiment=metaworld_cw", "algorithm=lora_per_task", "algorithm.train_base_on_first_task=false"
    )
    assert cfg.algorithm.train_base_on_first_task is False
    # The validation recipe shares the test's fixed settings.
    cfg = compose_config("experiment=metaworld_cw_val", "algorithm=lora_per_task")
    assert cfg.algorithm.train_base_on_first_task is True
    # An algorithm without settings for the experiment keeps its YAML.
    default = compose_config("algorithm=sequential").algorithm
    assert compose_config("experiment=metaworld_cw", "algorithm=sequential").algorithm == default


@pytest.mark.parametrize("path", SETTINGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_settings_file_names_an_experiment_an_algorithm_and_their_keys(path):
    assert (CONF_DIR / "experiment" / f"{path.parent.name}.yaml").is_file()
    algo_yaml = CONF_DIR / "algorithm" / path.name
    assert algo_yaml.is_file()
    own = OmegaConf.load(path)
    unknown = set(own) - set(OmegaConf.load(algo_yaml)) - {"defaults"}
    assert not unknown, f"{path} sets keys that algorithm={path.stem} does not have: {sorted(unknown)}"
    cfg = compose_config(f"experiment={path.parent.name}", f"algorithm={path.stem}")
    for key, value in own.items():
        if key != "defaults":
            assert cfg.algorithm[key] == value
