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


def _experiment_module(name: str):
    import importlib.util

    path = CONF_DIR.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE = _experiment_module("metaworld_cw_table")
TUNE = _experiment_module("tune_metaworld_cw")


@pytest.mark.parametrize("algo", TABLE.ALGORITHMS)
def test_every_headline_run_and_tuning_point_composes_validates_and_builds(algo):
    """What the headline table and the tuning protocol launch is a valid run (no training)."""
    from cl_vla.cli import build_algorithm, validate_config

    build_algorithm(validate_config(compose_config("experiment=metaworld_cw", f"algorithm={algo}")).algorithm)
    for point in TUNE.points(algo) if algo in TUNE.GRID else []:
        overrides = [f"algorithm.{k}={v}" for k, v in point.items()]
        cfg = validate_config(compose_config("experiment=metaworld_cw_val", f"algorithm={algo}", *overrides))
        build_algorithm(cfg.algorithm)
        for k, v in point.items():
            assert str(cfg.algorithm[k]) == v


def test_the_grid_lists_each_default_first_and_only_existing_knobs():
    for algo, grid in TUNE.GRID.items():
        default = OmegaConf.load(CONF_DIR / "algorithm" / f"{algo}.yaml")
        for key, values in grid.items():
            assert key in default, f"{algo}: {key} is not a setting of algorithm={algo}"
            if algo != "gem":  # GEM's paper default (256 a past task a step) is too slow for a CPU grid
                assert float(values[0]) == float(default[key]), f"{algo}.{key}: the default first"
