"""What ``train.py`` runs: validate the composed config, build the data, then train (or stop early)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cl_vla.config.schema import apply_seed_aliases
from cl_vla.errors import CLVLAError, ConfigError, one_of

log = logging.getLogger("cl_vla")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Range checks the schema cannot express; fold the seed's aliases. One sentence per problem."""
    cfg = apply_seed_aliases(cfg)
    steps = cfg.continual_learning.steps_per_task
    if steps <= 0:
        raise ConfigError(
            f"continual_learning.steps_per_task={steps} is not allowed; it must be a positive integer."
        )
    if cfg.data.batch_size <= 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not allowed; it must be positive.")
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError(
            f"data.heldout_fraction={cfg.data.heldout_fraction} is not allowed; it must be in [0, 1)."
        )
    mw = cfg.data.get("memory_workers", "auto")
    if mw != "auto" and (isinstance(mw, bool) or not isinstance(mw, int) or mw < 0):
        raise ConfigError(f"data.memory_workers={mw!r} is not allowed; it must be 'auto' or an int >= 0.")
    from cl_vla.data.stats import NormalizationChoice

    NormalizationChoice.parse(cfg.data.normalization)
    if cfg.data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source={cfg.data.source!r} is not allowed; choose {one_of(DATA_SOURCES)}.")
    from cl_vla.data.cross_sequence import is_cross_dataset

    # A cross-dataset sequence's datasets give their own roots.
    if (
        cfg.data.root is None
        and str(cfg.data.repo_id).startswith("local/")
        and not is_cross_dataset(cfg.task_sequence)
    ):
        raise ConfigError(
            "data.root is not set; data=local reads a LeRobot dataset from disk: "
            "give data.root=<dataset directory> (the one holding meta/info.json)."
        )
    if cfg.eval.type not in ("heldout", "sim"):
        raise ConfigError(f"eval.type={cfg.eval.type!r} is not allowed; choose {one_of(['heldout', 'sim'])}.")
    within = cfg.eval.within_task_evals
    if within < 0:
        raise ConfigError(f"eval.within_task_evals={within} is not allowed; it must be an integer >= 0.")
    if cfg.eval.get("keep_best_within_task", False) and within == 0:
        raise ConfigError(
            "eval.keep_best_within_task=true needs eval.within_task_evals > 0: without evaluations during "
            "a task there is no best point to keep (LIBERO's protocol evaluates every eval_every epochs)."
        )
    if cfg.eval.type == "sim":
        from cl_vla.evaluation.simulators import check_sim_config

        check_sim_config(cfg)
    from cl_vla.config.strategy import check_strategy

    check_strategy(cfg)
    from cl_vla.training.trainer import check_trainer_config

    check_trainer_config(cfg)
    if "_target_" not in cfg.algorithm:
        raise ConfigError("algorithm has no _target_; pick a choice of conf/algorithm/ (e.g. algorithm=er).")
    return cfg


DATA_SOURCES = ("synthetic", "metaworld", "local", "hub")


def check_accelerator(trainer_cfg: Any) -> None:
    """Refuse a GPU trainer on a machine without one before any data is read (Lightning would say so
    only at the first fit, in a traceback, after data preparation)."""
    acc = str(trainer_cfg.accelerator)
    if acc not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ConfigError(
            f"trainer.accelerator={acc!r} but torch sees no CUDA GPU on this machine; "
            "use trainer=cpu (or trainer=ddp_cpu) here, or run on a GPU machine."
        )
    devices = trainer_cfg.devices
    if isinstance(devices, int) and devices > available:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {available} CUDA GPU(s); "
            f"set trainer.devices to at most {available} (or -1 for all)."
        )


def build_algorithm(algo_cfg: Any):
    """Instantiate the ``algorithm`` group, turning constructor errors into one sentence."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    node = (
        OmegaConf.to_container(algo_cfg, resolve=True) if isinstance(algo_cfg, DictConfig) else dict(algo_cfg)
    )
    node.pop("name", None)
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, CLVLAError | ValueError):
            raise ConfigError(str(cause).splitlines()[0]) from e
        msg = str(cause).splitlines()[0]
        raise ConfigError(f"algorithm={algo_cfg.get('name', '?')} could not be built: {msg}") from e


def prepare_data(cfg: DictConfig, policy_type_cfg: Any | None = None):
    """Open (or write) the dataset, resolve the sequence, split the episodes. Returns ContinualData."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.datasets.factory import resolve_delta_timestamps

    from cl_vla.data.multi_source import is_cross_dataset, prepare_cross_data
    from cl_vla.data.streams import build_continual_data, ensure_synthetic, open_dataset
    from cl_vla.data.task_sequences import TaskSequence
    from cl_vla.data.windows import WindowedDataset, split_deltas
    from cl_vla.policies.configs import build_policy_config

    if is_cross_dataset(cfg.task_sequence):  # each task names its own dataset
        return prepare_cross_data(cfg, _device(cfg))
    seq = TaskSequence.from_mapping(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    # Only a synthetic / metaworld source writes data: an experiment preset's `data.synthetic` settings
    # must never turn data=local into a freshly written synthetic dataset.
    if cfg.data.source == "synthetic" and cfg.data.synthetic is not None:
        ensure_synthetic(cfg.data, seq)
    if cfg.data.source == "metaworld" and cfg.data.get("record") is not None:
        from cl_vla.envs.metaworld_record import ensure_recorded

        ensure_recorded(cfg.data, seq)
    root = cfg.data.root
    ds = open_dataset(cfg.data.repo_id, root, None, cfg.data.video_backend)  # validates root / hub first
    meta: LeRobotDatasetMetadata = ds.meta
    policy_cfg = build_policy_config(OmegaConf.to_container(cfg.model, resolve=True), meta, _device(cfg))
    in_memory, visual = split_deltas(resolve_delta_timestamps(policy_cfg, meta), meta.features)
    if visual:
        ds = open_dataset(cfg.data.repo_id, root, visual, cfg.data.video_backend)
    if in_memory:
        ds = WindowedDataset(ds, in_memory)
    data = build_continual_data(ds, seq, cfg.data.heldout_fraction, cfg.data.split_seed)
    return data, policy_cfg


def _device(cfg: DictConfig) -> str:
    """Where lerobot's device step puts batches: where Lightning puts the policy."""
    import torch

    acc = str(cfg.trainer.accelerator)
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def run_main(cfg: DictConfig) -> float | None:
    """Hydra task function body; user errors become one line on stderr and exit code 2."""
    from rich.console import Console

    # Logs and CI have no terminal width; keep task names readable there.
    console = Console(width=None if sys.stdout.isatty() else 140)
    _one_log_handler()
    handle = None
    try:
        cfg = validate_config(cfg)
        if not cfg.dry_run:
            check_accelerator(cfg.trainer)  # this machine's: recipes for GPUs still validate anywhere
        from cl_vla.training.run_dir import open_run, run_finished

        # Before any data or model: a refused resume or a busy run directory costs nothing.
        handle = open_run(cfg, claim=not cfg.dry_run)
        if run_finished(handle):
            console.print(f"{handle.run_dir} already finished: nothing to do", soft_wrap=True)
            return None
        algorithm = build_algorithm(cfg.algorithm)
        data, policy_cfg = prepare_data(cfg)
        console.print(_task_table(data))
        if cfg.dry_run:
            return None
        from cl_vla.training.loop import run_continual

        return run_continual(cfg, data, policy_cfg, algorithm, console=console, handle=handle)
    except (CLVLAError, OmegaConfBaseException) as e:
        _fail(str(e) or type(e).__name__)
    except ImportError as e:
        # Optional policy/simulator dependencies: lerobot's message names the extra to install.
        _fail(f"a package this configuration needs is missing: {e}")
    except Exception as e:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        if not isinstance(e, MisconfigurationException):
            raise
        _fail(f"Lightning refused the trainer settings: {e}")
    finally:
        if handle is not None:
            handle.close()


def _one_log_handler() -> None:
    """Lightning gives its loggers console handlers of their own at import; once Hydra has configured
    the root logger every Lightning line would print twice. Let Lightning's lines go through Hydra's
    handlers only (console and the run's train.log)."""
    if not logging.getLogger().handlers:
        return
    import lightning.pytorch  # noqa: F401  (its import adds the handlers removed below)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True


class JobFailed(CLVLAError):
    """One job of a Hydra multirun failed; the others go on and the report lists it."""


def _fail(message: str) -> None:
    line = message.strip().splitlines()[0]
    print(f"error: {line}", file=sys.stderr)
    if _in_multirun():
        # sys.exit would end the whole sweep; an exception marks just this job failed.
        raise JobFailed(line) from None
    sys.exit(2)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _task_table(data):
    from cl_vla.data.streams import task_table

    return task_table(data)
