"""Bad input on the way into the loop: algorithm hyperparameters, config ranges, unknown choices.

Each failure is one sentence naming the key and what is allowed; ``train.py`` prints it as the last
stderr line and exits non-zero without a traceback.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cl_vla.cli import build_algorithm, run_main, validate_config
from cl_vla.errors import ConfigError
from conftest import compose_config, run_train


@pytest.fixture(scope="module")
def er_node() -> dict:
    """The default ``algorithm`` group (ER) as composed, resolved to a plain dict."""
    cfg = validate_config(compose_config())
    assert cfg.algorithm.name == "er"
    return OmegaConf.to_container(cfg.algorithm, resolve=True)


def _er(er_node: dict, **changes):
    return OmegaConf.create({**er_node, **changes})


# ---- build_algorithm ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("replay_batch_ratio", 1.0, r"replay_batch_ratio must be in \[0, 1\), got 1\.0"),
        ("replay_batch_ratio", -0.1, r"replay_batch_ratio must be in \[0, 1\), got -0\.1"),
        ("buffer_size_per_task", 0, r"buffer_size_per_task must be a positive int, got 0"),
        ("buffer_size_per_task", -5, r"buffer_size_per_task must be a positive int, got -5"),
    ],
)
def test_er_out_of_range_is_one_sentence(er_node: dict, key: str, value: float, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        build_algorithm(_er(er_node, **{key: value}))
    assert "\n" not in str(info.value)


def test_er_in_range_edges_build(er_node: dict) -> None:
    algo = build_algorithm(_er(er_node, replay_batch_ratio=0.0, buffer_size_per_task=1))
    assert algo.replay_batch_ratio == 0.0
    assert algo.buffer_size_per_task == 1


def test_unknown_algorithm_kwarg_is_named(er_node: dict) -> None:
    with pytest.raises(ConfigError, match=r"algorithm=er could not be built: .*'not_a_kwarg'") as info:
        build_algorithm(_er(er_node, not_a_kwarg=1))
    assert "\n" not in str(info.value)


def test_run_main_reports_bad_ratio_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run_main(compose_config("algorithm.replay_batch_ratio=-0.1", "dry_run=true"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "error: replay_batch_ratio must be in [0, 1), got -0.1."
    ]


# ---- validate_config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (
            "continual_learning.steps_per_task=0",
            r"continual_learning\.steps_per_task=0 is not allowed; .*positive",
        ),
        ("data.normalization=bogus", r"data\.normalization='bogus' is not allowed; choose 'dataset'"),
    ],
)
def test_validate_config_names_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        validate_config(compose_config(override))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("trainer.lr=nan", "error: trainer.lr=nan is not allowed; it must be a finite number > 0."),
        ("trainer.lr=inf", "error: trainer.lr=inf is not allowed; it must be a finite number > 0."),
        (
            "trainer.warmup_steps=-1",
            "error: trainer.warmup_steps=-1 is not allowed; it must be an integer >= 0.",
        ),
        (
            "trainer.min_lr_ratio=1.5",
            "error: trainer.min_lr_ratio=1.5 is not allowed; it must be a number in [0, 1].",
        ),
        (
            "trainer.weight_decay=-0.1",
            "error: trainer.weight_decay=-0.1 is not allowed; it must be a finite number >= 0.",
        ),
        (
            "+trainer.lightning.log_every_n_steps=5",
            "error: trainer.lightning.log_every_n_steps is not allowed: cl_vla sets that argument from "
            "trainer.log_every_n_steps; set trainer.log_every_n_steps instead.",
        ),
    ],
)
def test_bad_trainer_value_is_one_line_before_any_work(capsys, tmp_path, override: str, line: str) -> None:
    """Refused in validation, before the run directory is claimed or any data is read."""
    with pytest.raises(SystemExit) as info:
        run_main(compose_config(override, f"output_dir={tmp_path / 'run'}"))
    assert info.value.code == 2
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()] == [line]
    assert not (tmp_path / "run").exists()


# ---- train.py (subprocess) --------------------------------------------------------------------------------


def test_train_py_unknown_model_lists_choices() -> None:
    proc = run_train(["model=nonexistent_model"], timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "model/nonexistent_model" in proc.stderr
    assert "Available options" in proc.stderr
    for choice in ("tiny_vla", "act", "diffusion", "smolvla"):
        assert choice in proc.stderr
