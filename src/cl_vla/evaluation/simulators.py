"""Closed-loop evaluation (``eval=sim``): tasks scored by success in a simulator, one row of R after
each task. :func:`make_sim_evaluator` builds Meta-World's (:mod:`cl_vla.envs.metaworld_eval`) or
LIBERO's (:mod:`cl_vla.envs.libero_eval`) evaluator from the config.
"""

from __future__ import annotations


def sim_env_name(eval_cfg, suite: str | None) -> str:
    """The simulator ``eval=sim`` uses: ``eval.env``, else the one the sequence's suite names."""
    from cl_vla.errors import ConfigError, one_of

    env = eval_cfg.env or (
        "metaworld" if suite == "metaworld" else "libero" if (suite or "").startswith("libero") else None
    )
    if env not in ("metaworld", "libero"):
        raise ConfigError(
            f"eval=sim needs a simulator: eval.env={eval_cfg.env!r} and task_sequence.suite={suite!r} "
            f"name none; set eval.env to {one_of(['metaworld', 'libero'])}."
        )
    return env


def check_sim_config(cfg) -> None:
    """Early checks of ``eval=sim`` (before recording or training): settings, simulator, task names."""
    from cl_vla.data.cross_sequence import is_cross_dataset
    from cl_vla.envs.metaworld import MAX_PATH_LENGTH
    from cl_vla.errors import ConfigError
    from cl_vla.evaluation.closed_loop import check_sim_settings

    if is_cross_dataset(cfg.task_sequence):
        # A cross-dataset task is labelled by a name, a dataset or several instructions, not by the one
        # instruction a simulator episode must be prompted with; refuse rather than prompt with a label.
        raise ConfigError(
            f"eval=sim is not available yet for sequence {cfg.task_sequence.name!r}, whose tasks come from "
            "several datasets (task_sequence.datasets); use eval=heldout."
        )
    env = sim_env_name(cfg.eval, cfg.task_sequence.suite)
    if env == "metaworld":
        check_sim_settings(cfg.eval, MAX_PATH_LENGTH, "Meta-World")
        from cl_vla.envs.metaworld import check_task_names

        if not cfg.task_sequence.env_tasks:
            raise ConfigError(
                "eval=sim in Meta-World needs task_sequence.env_tasks (the Meta-World task of each "
                f"instruction), but sequence {cfg.task_sequence.name!r} has none."
            )
        check_task_names(list(cfg.task_sequence.env_tasks))
    else:
        from cl_vla.envs.libero_eval import check_libero_available, init_state_ids
        from cl_vla.envs.libero_schema import get_schema

        check_sim_settings(cfg.eval, max_steps=10_000, simulator="LIBERO")
        init_state_ids(cfg.eval)
        if cfg.eval.libero_schema != "auto":
            get_schema(cfg.eval.libero_schema)
        check_libero_available(cfg.task_sequence.suite, cfg.eval.libero_assets)


def make_sim_evaluator(cfg, data, policy_cfg, run_dir=None, wandb_run=None):
    """The closed-loop evaluator of ``eval=sim``: ``evaluate(module, tasks, label) -> success rates``."""
    seq = data.sequence
    if sim_env_name(cfg.eval, seq.suite) == "libero":
        from cl_vla.envs.libero_eval import LiberoEvaluator

        return LiberoEvaluator(
            seq.suite,
            seq.env_tasks,
            data.task_names,
            policy_cfg,
            cfg.eval,
            run_dir=run_dir,
            wandb_run=wandb_run,
            # A sequence across datasets may read its cameras resized (task_sequence.image_size).
            render_size=getattr(data.dataset.meta, "recorded_camera_size", None),
        )
    from cl_vla.envs.metaworld_eval import MetaworldEvaluator
    from cl_vla.envs.metaworld_record import read_settings

    settings = read_settings(cfg.data.root) if cfg.data.root else None
    return MetaworldEvaluator(
        seq.env_tasks or (),
        data.task_names,
        policy_cfg,
        cfg.eval,
        demo_seeds=(settings or {}).get("seeds_tried"),
        run_dir=run_dir,
        wandb_run=wandb_run,
    )
