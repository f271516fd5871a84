"""The one Lightning ``Trainer`` of a run, built from the ``trainer`` and ``logger`` config groups.

Users add Lightning callbacks and loggers from the command line, as lightning-hydra-template does, by
``_target_`` entries that Hydra instantiates::

    python train.py '+trainer.callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor'
    python train.py '+logger.extra.mlflow._target_=lightning.pytorch.loggers.MLFlowLogger'
    python train.py +trainer.lightning.benchmark=true      # any other lightning.Trainer argument

The arguments the continual loop owns (steps, checkpointing, samplers, the loggers and callbacks lists
themselves) and those set from another key (``log_every_n_steps`` from ``trainer.log_every_n_steps``...)
are refused from ``trainer.lightning`` with one sentence naming that key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from cl_vla.config.instantiate import instantiate_named
from cl_vla.errors import ConfigError

#: lightning.Trainer arguments set by the loop: one Trainer spans every task, its step budget grows per
#: task, checkpoints are ours (atomic, hashed), and batches come from our task-aware samplers.
LOOP_OWNED = frozenset(
    {
        "max_steps",
        "max_epochs",
        "min_steps",
        "min_epochs",
        "logger",
        "callbacks",
        "plugins",
        "enable_checkpointing",
        "enable_model_summary",
        "use_distributed_sampler",
        "reload_dataloaders_every_n_epochs",
        "limit_train_batches",
        "limit_val_batches",
        "num_sanity_val_steps",
        "accumulate_grad_batches",
        "default_root_dir",
    }
)

#: lightning.Trainer arguments :func:`build_trainer` sets from one of cl_vla's own keys (that key is the
#: way to change them; given twice, Lightning would fail with a TypeError).
FROM_KEYS: dict[str, str] = {
    "accelerator": "trainer.accelerator",
    "devices": "trainer.devices",
    "strategy": "trainer.strategy",
    "num_nodes": "trainer.num_nodes",
    "precision": "trainer.precision",
    "log_every_n_steps": "trainer.log_every_n_steps",
    "deterministic": "trainer.deterministic",
    "enable_progress_bar": "trainer.progress_bar",
    "gradient_clip_val": "trainer.grad_clip_norm",
}


def extra_trainer_args(
    cfg: DictConfig, set_here: Iterable[str] = LOOP_OWNED | FROM_KEYS.keys()
) -> dict[str, Any]:
    """``trainer.lightning``: further lightning.Trainer arguments, minus any that cl_vla sets itself
    (``set_here``: by default every argument :func:`build_trainer` passes)."""
    extra = OmegaConf.to_container(cfg.trainer.lightning, resolve=True) or {}
    clash = sorted(set(extra) & set(set_here))
    if not clash:
        return extra
    arg = clash[0]
    if arg in FROM_KEYS:
        raise ConfigError(
            f"trainer.lightning.{arg} is not allowed: cl_vla sets that argument from {FROM_KEYS[arg]}; "
            f"set {FROM_KEYS[arg]} instead."
        )
    raise ConfigError(
        f"trainer.lightning.{arg} is set by the continual loop and cannot be overridden; "
        "use continual_learning.steps_per_task, trainer.checkpoint_every_n_steps or trainer.callbacks."
    )


def _finite(lo: float, lo_open: bool, hi: float | None = None) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)

    return ok


def _count(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


#: Range of each numeric trainer setting: (check, what is allowed). NaN and infinities fail every one.
TRAINER_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_finite(0.0, True), "a finite number > 0"),
    "weight_decay": (_finite(0.0, False), "a finite number >= 0"),
    "warmup_steps": (_count(0), "an integer >= 0"),
    "min_lr_ratio": (_finite(0.0, False, 1.0), "a number in [0, 1]"),
    "grad_clip_norm": (lambda v: v is None or _finite(0.0, True)(v), "null or a finite number > 0"),
    "checkpoint_every_n_steps": (_count(0), "an integer >= 0 (0: only at task ends)"),
    "log_every_n_steps": (_count(1), "an integer >= 1"),
    "num_nodes": (_count(1), "an integer >= 1"),
}


def check_trainer_config(cfg: DictConfig) -> None:
    """The ``trainer`` group's values, before any data is read: one sentence for the first bad one."""
    t = cfg.trainer
    for key, (ok, allowed) in TRAINER_RANGES.items():
        value = t.get(key)
        if not ok(value):
            raise ConfigError(f"trainer.{key}={value!r} is not allowed; it must be {allowed}.")
    extra_trainer_args(cfg)


def fsdp_devices(t: DictConfig) -> int:
    """Processes per node under ``strategy=fsdp``: ``devices``, or every visible GPU for -1 / "auto"."""
    if str(t.devices) in ("-1", "auto"):
        import torch

        return max(1, torch.cuda.device_count())
    return int(t.devices)


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    *,
    max_steps: int,
    loggers: list[Logger],
    callbacks: list[Callback],
    plugins: list[Any],
    grad_clip_norm: float | None,
) -> L.Trainer:
    """The run's Trainer: our callbacks first (the progress bar), then the configured ones."""
    t = cfg.trainer
    callbacks = [*callbacks, *instantiate_named(t.callbacks, Callback, "trainer.callbacks")]
    strategy: Any = t.strategy
    if strategy == "fsdp":
        from cl_vla.training.fsdp import build_strategy

        strategy = build_strategy(fsdp_devices(t), int(t.num_nodes))
    own: dict[str, Any] = dict(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_steps=max_steps,
        max_epochs=-1,
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=bool(t.progress_bar),
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=grad_clip_norm,
        deterministic=t.deterministic or None,
        default_root_dir=str(run_dir),
        plugins=plugins,
        reload_dataloaders_every_n_epochs=1,
    )
    # Refused against what is really passed here, so an argument added above is never given twice.
    return L.Trainer(**own, **extra_trainer_args(cfg, set_here=own))
