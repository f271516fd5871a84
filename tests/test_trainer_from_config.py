"""Trainer, loggers and callbacks come from the config: a Lightning callback or logger added on the
command line takes part in a real run, and the arguments the loop owns are refused in one sentence."""

from __future__ import annotations

import csv
import math

import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from cl_vla.config.instantiate import instantiate_named
from cl_vla.errors import ConfigError
from cl_vla.training.trainer import extra_trainer_args
from conftest import compose_config, in_process_overrides, train_in_process

LR_MONITOR = [
    "+trainer.callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
    "+trainer.callbacks.lr_monitor.logging_interval=step",
]


@pytest.mark.slow
def test_a_callback_added_on_the_command_line_logs_the_per_task_schedule(synthetic_libero, tmp_path):
    root, repo_id, _ = synthetic_libero
    steps, warmup, lr = 5, 2, 1e-3
    overrides = in_process_overrides("sequential", root, repo_id, "callbacks2", steps=steps)
    extra = [f"trainer.warmup_steps={warmup}", f"trainer.lr={lr}", "trainer.log_every_n_steps=1"]
    train_in_process([*overrides, *extra, *LR_MONITOR], tmp_path)
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW")]
    logged = {int(r["step"]): float(r["lr-AdamW"]) for r in rows}
    assert sorted(logged) == list(range(2 * steps)), logged

    def expected(s: int) -> float:  # warmup then cosine to min_lr_ratio=0.1, restarted per task
        if s < warmup:
            return lr * (s + 1) / (warmup + 1)
        progress = min(1.0, (s - warmup) / (steps - warmup))
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    for step, value in logged.items():
        assert value == pytest.approx(expected(step % steps), rel=1e-6), (step, value)


def test_a_logger_added_on_the_command_line_is_built(tmp_path):
    cfg = compose_config(
        "+logger.extra.tb._target_=lightning.pytorch.loggers.TensorBoardLogger",
        f"+logger.extra.tb.save_dir={tmp_path}",
    )
    (logger,) = instantiate_named(cfg.logger.extra, Logger, "logger.extra")
    assert type(logger).__name__ == "TensorBoardLogger" and logger.save_dir == str(tmp_path)


def test_an_entry_that_is_not_a_callback_is_refused_in_one_sentence():
    cfg = compose_config("+trainer.callbacks.bad._target_=collections.OrderedDict")
    with pytest.raises(
        ConfigError, match=r"trainer\.callbacks\.bad built a OrderedDict, not a lightning Callback"
    ):
        instantiate_named(cfg.trainer.callbacks, Callback, "trainer.callbacks")
    cfg = compose_config("+trainer.callbacks.bad=3")
    with pytest.raises(ConfigError, match=r"trainer\.callbacks\.bad must be a mapping with a _target_"):
        instantiate_named(cfg.trainer.callbacks, Callback, "trainer.callbacks")


def test_trainer_arguments_pass_through_except_those_the_loop_owns():
    assert extra_trainer_args(compose_config("+trainer.lightning.benchmark=true")) == {"benchmark": True}
    with pytest.raises(ConfigError, match=r"trainer\.lightning\.max_steps is set by the continual loop"):
        extra_trainer_args(compose_config("+trainer.lightning.max_steps=3"))


def test_every_trainer_argument_cl_vla_sets_is_refused_naming_its_key(monkeypatch, tmp_path):
    """Each argument build_trainer passes is refused from trainer.lightning (before any data), naming
    the key that sets it, instead of Lightning's "got multiple values for keyword argument"."""
    import cl_vla.training.trainer as trainer_mod

    passed: dict = {}
    monkeypatch.setattr(trainer_mod.L, "Trainer", lambda **kw: passed.update(kw))
    cfg = compose_config(f"output_dir={tmp_path}")
    trainer_mod.build_trainer(
        cfg, tmp_path, max_steps=1, loggers=[], callbacks=[], plugins=[], grad_clip_norm=None
    )
    assert set(passed) <= trainer_mod.LOOP_OWNED | trainer_mod.FROM_KEYS.keys()
    for arg in passed:
        with pytest.raises(ConfigError) as info:
            trainer_mod.check_trainer_config(compose_config(f"+trainer.lightning.{arg}=1"))
        key = trainer_mod.FROM_KEYS.get(arg)
        assert f"trainer.lightning.{arg}" in str(info.value)
        assert (f"set {key} instead" if key else "set by the continual loop") in str(info.value)
