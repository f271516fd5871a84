"""The one Lightning ``Trainer`` of a run, built from the ``trainer`` and ``logger`` config groups.

Users add Lightning callbacks and loggers from the command line, as lightning-hydra-template does, by
``_target_`` entries that Hydra instantiates::

    python train.py '+trainer.callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor'
    python train.py '+logger.extra.mlflow._target_=lightning.pytorch.loggers.MLFlowLogger'
    python train.py +trainer.lightning.benchmark=true      # any other lightning.Trainer argument

The arguments the continual loop owns (steps, checkpointing, samplers, the loggers and callbacks lists
themselves) are refused from ``trainer.lightning`` with one sentence.
"""

from __future__ import annotations

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
        "enable_progress_bar",
        "use_distributed_sampler",
        "reload_dataloaders_every_n_epochs",
        "limit_train_batches",
        "limit_val_batches",
        "num_sanity_val_steps",
        "accumulate_grad_batches",
        "default_root_dir",
        "gradient_clip_val",
    }
)


def extra_trainer_args(cfg: DictConfig) -> dict[str, Any]:
    """``trainer.lightning``: further lightning.Trainer arguments, minus those the loop owns."""
    extra = OmegaConf.to_container(cfg.trainer.lightning, resolve=True) or {}
    owned = sorted(set(extra) & LOOP_OWNED)
    if owned:
        raise ConfigError(
            f"trainer.lightning.{owned[0]} is set by the continual loop and cannot be overridden; "
            "use continual_learning.steps_per_task, trainer.checkpoint_every_n_steps or trainer.callbacks."
        )
    return extra


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
    return L.Trainer(
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
        **extra_trainer_args(cfg),
    )
