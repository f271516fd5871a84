"""Structured config: the schema Hydra validates ``conf/`` against.

Unknown keys and values of the wrong type are rejected by OmegaConf with the key's full name. The
``algorithm`` and ``model`` groups are open mappings (each choice has its own fields); they are
validated when built (``cl_vla.cli``), with one sentence naming the bad key.

The seed's keys keep their meaning: ``continual_learning.{task_sequence, steps_per_task,
save_checkpoint_per_task}`` live here as they did, and ``replay.{enabled, method,
buffer_size_per_task, replay_batch_ratio, balanced_sampling}`` is an alias block that, when any of its
values is set, selects and parametrizes experience replay (see :func:`apply_seed_aliases`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from cl_vla.errors import ConfigError


@dataclass
class TaskSequenceConfig:
    name: str = MISSING
    # In training order: instruction strings or dataset task indices (one dataset: data.*), or, when
    # `datasets` is set, mappings {dataset, instruction | instructions | tasks, name, env_task}
    # (cl_vla.data.multi_source).
    tasks: list[Any] = MISSING
    suite: str | None = None  # simulator suite (libero_spatial, metaworld, ...) for closed-loop evaluation
    env_tasks: list[str] | None = None  # the simulator's task names, paired with `tasks`
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    # Cross-dataset sequences: the datasets the tasks name, name -> {repo_id, root, rename, synthetic, fps}
    # (checked in cl_vla.data.multi_source, so `+task_sequence.datasets.x={...}` works on the command
    # line). Empty: every task comes from data.*.
    datasets: dict[str, Any] = field(default_factory=dict)
    image_size: list[int] | None = None  # [height, width] every camera is resized to; None: the first's
    fps_rule: str = "same"  # same: refuse datasets of different fps | own_frames: windows in own frames


@dataclass
class SyntheticDataConfig:
    episodes_per_task: int = 6
    frames_per_episode: int = 20
    image_size: int = 64
    fps: int = 10
    seed: int = 0
    use_videos: bool = False
    schema: str = "ipec"  # the LIBERO dataset schema of its feature keys (cl_vla.envs.libero_schema)


@dataclass
class MetaworldRecordConfig:
    """``data.record``: scripted-expert Meta-World demonstrations (:mod:`cl_vla.envs.metaworld_record`)."""

    episodes_per_task: int = 20  # successful episodes kept per task
    max_steps: int = 200  # an expert episode not successful by then is dropped (next seed tried)
    cameras: list[str] = field(default_factory=lambda: ["corner2"])
    image_size: int = 64
    environment_state: bool = True  # also record Meta-World's 39-d state as observation.environment_state
    fps: int = 80
    seed: int = 0  # demonstrations use seeds seed, seed+1, ...; eval=sim refuses these
    action_noise: float = 0.0  # std of noise on the executed (not the recorded) action
    use_videos: bool = False
    num_workers: int = 2  # recording processes (0: in this process)


@dataclass
class DataConfig:
    # Where the frames come from: synthetic (written from `synthetic`), metaworld (recorded from `record`),
    # local (a dataset at `root`, never written) or hub (`repo_id`, read from `root` when given).
    # Only `synthetic` / `metaworld` ever write a dataset, whatever an experiment preset sets.
    source: str = "hub"
    repo_id: str = MISSING
    root: str | None = None  # a local copy; None: lerobot's cache / a hub download where reachable
    synthetic: SyntheticDataConfig | None = None  # set: write a synthetic LIBERO-schema dataset at `root`
    record: MetaworldRecordConfig | None = None  # set: record Meta-World demonstrations at `root`
    heldout_fraction: float = 0.2  # share of each task's episodes kept for evaluation
    split_seed: int = 0
    normalization: str = "dataset"  # dataset | first_task | seen_tasks
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    # GEM / A-GEM / MIR memory batches: decoded ahead in this many extra loader processes (0: inside the
    # step); auto: as many as num_workers where the machine has cores to spare, else 0.
    memory_workers: Any = "auto"
    video_backend: str | None = None


@dataclass
class ContinualLearningConfig:
    task_sequence: str | None = None  # seed alias: names a sequence and overrides the task_sequence group
    steps_per_task: int = 10000
    save_checkpoint_per_task: bool = True
    export_per_task: bool = True  # <run>/export/task_XX: policy + processors in lerobot's format


@dataclass
class ReplayAliasConfig:
    enabled: bool | None = None
    method: str | None = None
    buffer_size_per_task: int | None = None
    replay_batch_ratio: float | None = None
    balanced_sampling: bool | None = None


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    # strategy=fsdp: parameters gathered in bfloat16 for compute, gradients reduced in float32 (GPU only).
    fsdp_mixed_precision: str = "none"  # none | bf16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip_norm: float | None = 10.0
    reset_optimizer_per_task: bool = True
    checkpoint_every_n_steps: int = 0  # 0: only at task ends
    log_every_n_steps: int = 10
    deterministic: bool = False
    progress_bar: bool = True
    # Lightning callbacks by name, each a `_target_` mapping Hydra instantiates (cl_vla.training.trainer).
    callbacks: dict[str, Any] = field(default_factory=dict)
    # Any other lightning.Trainer argument (those the continual loop owns are refused).
    lightning: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "cl_vla"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: bool = True
    tensorboard: bool = False
    # Further Lightning loggers by name, each a `_target_` mapping (e.g. MLFlowLogger).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    type: str = "heldout"  # heldout (action loss on held-out episodes) | sim (closed-loop success)
    max_batches: int | None = None  # per task; None: every held-out frame
    within_task_evals: int = 0  # extra evaluations of the current task during its training (LIBERO FWT)
    keep_best_within_task: bool = False  # LIBERO's protocol: end each task with its best within-task weights
    evaluate_unseen: bool = True  # also evaluate tasks not trained yet (forward transfer)
    cache_baseline: bool = True  # eval=sim: the untrained row from cl_vla.evaluation.baseline_cache
    env: str | None = None  # sim: metaworld | libero; None: from task_sequence.suite
    episodes: int = 10  # sim: episodes per task and evaluation
    max_episode_steps: int | None = None  # sim: None = the simulator's (Meta-World 150, LIBERO per suite)
    parallel_envs: int | None = None  # sim: episodes run at once (environments kept per task); None: all
    init_states: list[int] | None = None  # LIBERO: official init state of each episode; None: 0..episodes-1
    libero_schema: str = "auto"  # LIBERO: the training data's schema (lerobot, huggingfacevla, ipec, ...)
    libero_assets: str | None = None  # LIBERO: asset folder; None: $CL_VLA_LIBERO_ASSETS, cache, packages
    libero_settle_steps: int = 10  # LIBERO: no-op steps after each reset (lerobot's 10; LIBERO's own 5)
    libero_soft_reset: bool = True  # LIBERO: reset episodes on the built model instead of rebuilding it
    libero_fast_render: bool = False  # LIBERO: no shadows/reflections/multisampling (checks, not results)
    libero_max_envs: int = 8  # LIBERO: environments kept per process (~0.85 GB each), LRU tasks closed
    seed: int = 1_000_000  # sim: episode k is reset with seed + k (disjoint from the demonstrations')
    num_workers: int = 2  # sim: environment processes (0: in this process)
    timeout_s: float | None = 1800.0  # sim: wall-clock bound of one evaluation; unfinished episodes fail
    videos: int = 0  # sim: episodes per task saved as video (run dir and W&B)


@dataclass
class ExperimentConfig:
    name: str = "default"
    group: str | None = None
    notes: str = ""


@dataclass
class Config:
    task_sequence: TaskSequenceConfig = field(default_factory=TaskSequenceConfig)
    algorithm: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    continual_learning: ContinualLearningConfig = field(default_factory=ContinualLearningConfig)
    replay: ReplayAliasConfig = field(default_factory=ReplayAliasConfig)
    seed: int = 0
    output_dir: str = "."  # set by the Hydra run directory
    resume: str | None = None  # a run directory (or its checkpoint) to continue
    dry_run: bool = False  # build the data, print the task table, stop before training


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


_ER_TARGET = "cl_vla.algorithms.er.ReplayBuffer"


def apply_seed_aliases(cfg: DictConfig) -> DictConfig:
    """Fold the seed's ``replay:`` and ``continual_learning.task_sequence`` keys into our tree."""
    from cl_vla.data.task_sequences import get_task_sequence

    cl_seq = cfg.continual_learning.task_sequence
    if cl_seq and cl_seq != cfg.task_sequence.name:
        seq = get_task_sequence(cl_seq)
        with open_dict(cfg):
            cfg.task_sequence = OmegaConf.merge(
                OmegaConf.structured(TaskSequenceConfig),
                {
                    "name": seq.name,
                    "tasks": list(seq.tasks),
                    "suite": seq.suite,
                    "env_tasks": list(seq.env_tasks) if seq.env_tasks else None,
                    "aliases": list(seq.aliases),
                    "description": seq.description,
                },
            )
    with open_dict(cfg):
        cfg.continual_learning.task_sequence = cfg.task_sequence.name

    rp = cfg.replay
    values = {
        k: rp[k]
        for k in ("buffer_size_per_task", "replay_batch_ratio", "balanced_sampling")
        if rp[k] is not None
    }
    if rp.enabled is None and rp.method is None and not values:
        return cfg
    if rp.method is not None and rp.method not in ("experience_replay", "er"):
        raise ConfigError(
            f"replay.method={rp.method!r} is not allowed; the seed's only method is 'experience_replay'."
        )
    with open_dict(cfg):
        if rp.enabled is False:
            cfg.algorithm = OmegaConf.create(
                {"_target_": "cl_vla.algorithms.sequential.Sequential", "name": "sequential"}
            )
            return cfg
        if cfg.algorithm.get("_target_") != _ER_TARGET:
            cfg.algorithm = OmegaConf.create({"_target_": _ER_TARGET, "name": "er", "seed": cfg.seed})
        for k, v in values.items():
            cfg.algorithm[k] = v
    return cfg
