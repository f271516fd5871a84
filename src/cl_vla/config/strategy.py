"""Checks of the ``trainer`` group's distributed settings, before any data or model is built.

``trainer.strategy=fsdp`` (:mod:`cl_vla.training.fsdp`) shards the policy and every algorithm's
per-parameter state. Two algorithms do not run sharded yet; they, and the settings FSDP cannot take,
are refused here in one sentence instead of failing inside the first fit.
"""

from __future__ import annotations

from typing import Any

from cl_vla.errors import ConfigError, one_of

MIXED_PRECISION = ("none", "bf16")

#: Algorithms refused under FSDP, with why (what would have to be sharded first).
FSDP_UNSUPPORTED = {
    "packnet": "its pruning sorts each whole weight, which would need a quantile across shards",
    "lora_per_task": "it adds adapters to the policy at every task, after FSDP has sharded it",
}


def check_state_options(cfg: Any) -> None:
    """``algorithm.state_dtype`` / ``state_device`` only where an algorithm keeps per-parameter state
    across steps (GEM, A-GEM and MIR hold theirs for one step only; the others hold none)."""
    from cl_vla.algorithms.state_placement import PLACEABLE

    algo = str(cfg.algorithm.get("name", ""))
    given = [k for k in ("state_dtype", "state_device") if cfg.algorithm.get(k) is not None]
    if given and algo not in PLACEABLE:
        raise ConfigError(
            f"algorithm.{given[0]} applies to the algorithms that keep per-parameter state across steps "
            f"({', '.join(PLACEABLE)}); algorithm={algo} keeps none, remove the setting."
        )
    if str(cfg.trainer.strategy) == "fsdp" and str(cfg.algorithm.get("state_device", "params")) == "cpu":
        raise ConfigError(
            "algorithm.state_device=cpu does not run under trainer.strategy=fsdp yet (each rank's shards "
            "would have to be offloaded and put back as DTensors); use algorithm.state_device=params, where "
            "FSDP already keeps 1/N of the state on each GPU, or algorithm.state_dtype=bfloat16."
        )


def check_strategy(cfg: Any) -> None:
    """One sentence for a distributed setting that cannot work."""
    check_state_options(cfg)
    t = cfg.trainer
    mp = str(t.get("fsdp_mixed_precision", "none"))
    fsdp = str(t.strategy) == "fsdp"
    if mp not in MIXED_PRECISION:
        raise ConfigError(
            f"trainer.fsdp_mixed_precision={mp!r} is not allowed; choose {one_of(MIXED_PRECISION)}."
        )
    if not fsdp:
        if mp != "none":
            raise ConfigError(
                f"trainer.fsdp_mixed_precision={mp!r} applies only under trainer.strategy=fsdp "
                f"(this run uses {t.strategy!r}); use trainer.precision for other strategies."
            )
        return
    algo = str(cfg.algorithm.get("name", ""))
    if algo in FSDP_UNSUPPORTED:
        raise ConfigError(
            f"algorithm={algo} does not run under trainer.strategy=fsdp yet ({FSDP_UNSUPPORTED[algo]}); "
            "use DDP (trainer=ddp_cpu, or trainer=gpu with trainer.strategy=ddp) for it."
        )
    if str(cfg.eval.type) == "sim":
        raise ConfigError(
            "eval=sim does not run under trainer.strategy=fsdp yet (every forward of a sharded policy is a "
            "collective, and simulator episodes end at different steps on each rank); use eval=heldout, "
            "and evaluate the per-task exports (export/task_XX) in simulation afterwards."
        )
    if mp == "bf16" and str(t.accelerator) == "cpu":
        raise ConfigError(
            "trainer.fsdp_mixed_precision=bf16 needs GPUs; on a CPU use trainer.fsdp_mixed_precision=none "
            "(trainer=fsdp_cpu)."
        )
    devices = t.devices
    if not (isinstance(devices, int) and (devices >= 1 or devices == -1)) and str(devices) != "auto":
        raise ConfigError(
            f"trainer.devices={devices!r} is not allowed under trainer.strategy=fsdp; give a number of "
            "processes per node (or -1 for every GPU)."
        )


__all__ = ["FSDP_UNSUPPORTED", "MIXED_PRECISION", "check_state_options", "check_strategy"]
