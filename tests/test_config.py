"""The Hydra config tree: composition, the seed's keys, validation, data preparation and train.py errors."""

from __future__ import annotations

import pytest

from cl_vla.algorithms.er import ReplayBuffer
from cl_vla.algorithms.sequential import Sequential
from cl_vla.cli import build_algorithm, prepare_data, run_main, validate_config
from cl_vla.data import get_task_sequence
from cl_vla.errors import ConfigError, DataError
from conftest import compose_config, last_line, run_train, synthetic_overrides

SPATIAL = get_task_sequence("libero_spatial")
SEQUENCES = [
    "libero_spatial",
    "libero_object",
    "libero_goal",
    "libero_10",
    "libero_long",
    "cw10",
    "cw20",
    "mw_short",
]


def _local(synthetic_libero) -> list[str]:
    """Read the fixture dataset as any local dataset (never rewritten, whatever the sequence)."""
    root, repo_id, _ = synthetic_libero
    return ["data=local", f"data.root={root}", f"data.repo_id={repo_id}"]


def _quoted_list(items) -> str:
    return "[" + ", ".join(f'"{t}"' for t in items) + "]"


# ---- composition ---------------------------------------------------------------------------------


def test_defaults_compose_and_validate() -> None:
    cfg = validate_config(compose_config())
    assert cfg.task_sequence.name == "libero_spatial"
    assert list(cfg.task_sequence.tasks) == list(SPATIAL.tasks)
    assert cfg.algorithm._target_ == "cl_vla.algorithms.er.ReplayBuffer"
    assert cfg.continual_learning.task_sequence == "libero_spatial"
    assert cfg.continual_learning.save_checkpoint_per_task is True
    assert cfg.dry_run is False
    assert isinstance(build_algorithm(cfg.algorithm), ReplayBuffer)


@pytest.mark.parametrize("name", SEQUENCES)
def test_task_sequence_group_agrees_with_registry(name: str) -> None:
    cfg = compose_config(f"task_sequence={name}")
    seq = get_task_sequence(name)
    assert cfg.task_sequence.name == seq.name
    assert tuple(cfg.task_sequence.tasks) == seq.tasks
    assert tuple(cfg.task_sequence.env_tasks) == seq.env_tasks


def test_seed_task_sequence_key_selects_the_sequence() -> None:
    cfg = validate_config(compose_config("continual_learning.task_sequence=libero_goal"))
    goal = get_task_sequence("libero_goal")
    assert cfg.task_sequence.name == "libero_goal"
    assert tuple(cfg.task_sequence.tasks) == goal.tasks
    assert tuple(cfg.task_sequence.env_tasks) == goal.env_tasks
    assert cfg.task_sequence.suite == "libero_goal"
    assert cfg.continual_learning.task_sequence == "libero_goal"

    cfg = validate_config(compose_config("continual_learning.task_sequence=libero_long"))
    assert cfg.task_sequence.name == "libero_10"


def test_seed_task_sequence_key_unknown_name() -> None:
    with pytest.raises(ConfigError, match="Unknown task sequence 'libero_nothing'") as info:
        validate_config(compose_config("continual_learning.task_sequence=libero_nothing"))
    assert "'libero_goal'" in str(info.value) and "'cw20'" in str(info.value)


def test_seed_replay_keys_select_er_with_their_values() -> None:
    cfg = validate_config(
        compose_config(
            "algorithm=sequential",
            "replay.enabled=true",
            "replay.buffer_size_per_task=7",
            "replay.replay_batch_ratio=0.5",
            "replay.balanced_sampling=true",
            "seed=11",
        )
    )
    algo = build_algorithm(cfg.algorithm)
    assert isinstance(algo, ReplayBuffer)
    assert algo.buffer_size_per_task == 7
    assert algo.replay_batch_ratio == 0.5
    assert algo.balanced_sampling is True
    assert algo.seed == 11


def test_seed_replay_values_alone_parametrize_er() -> None:
    cfg = validate_config(compose_config("replay.method=experience_replay", "replay.buffer_size_per_task=3"))
    algo = build_algorithm(cfg.algorithm)
    assert isinstance(algo, ReplayBuffer)
    assert algo.buffer_size_per_task == 3
    assert algo.replay_batch_ratio == 0.3  # er.yaml's (the seed's) default kept


def test_seed_replay_disabled_is_sequential() -> None:
    cfg = validate_config(compose_config("replay.enabled=false"))
    assert isinstance(build_algorithm(cfg.algorithm), Sequential)


def test_seed_replay_bad_method() -> None:
    with pytest.raises(ConfigError, match=r"replay\.method='gem' is not allowed.*'experience_replay'"):
        validate_config(compose_config("replay.method=gem"))


def test_replay_value_out_of_range_is_one_sentence() -> None:
    cfg = validate_config(compose_config("replay.replay_batch_ratio=1.5"))
    with pytest.raises(ConfigError, match=r"replay_batch_ratio must be in \[0, 1\), got 1\.5"):
        build_algorithm(cfg.algorithm)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("continual_learning.steps_per_task=0", "continual_learning.steps_per_task=0 is not allowed"),
        ("continual_learning.steps_per_task=-3", "continual_learning.steps_per_task=-3 is not allowed"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed"),
        ("data.heldout_fraction=1.0", r"data.heldout_fraction=1.0 is not allowed; it must be in \[0, 1\)"),
        ("data.normalization=per_episode", "data.normalization='per_episode' is not allowed"),
        ("eval.type=online", "eval.type='online' is not allowed"),
        ("data=local", r"data.root is not set; data=local reads a LeRobot dataset from disk"),
        (
            "data.memory_workers=-1",
            r"data.memory_workers=-1 is not allowed; it must be 'auto' or an int >= 0",
        ),
        ("data.memory_workers=some", r"data.memory_workers='some' is not allowed"),
    ],
)
def test_validate_config_rejects_bad_values(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        validate_config(compose_config(override))
    assert "\n" not in str(info.value)


def test_schema_rejects_unknown_key_and_wrong_type() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"data\.nonexistent"):
        compose_config("data.nonexistent=1")
    with pytest.raises(ConfigCompositionException, match=r"continual_learning\.steps_per_task=abc"):
        compose_config("continual_learning.steps_per_task=abc")


# ---- data preparation ------------------------------------------------------------------------------


def test_prepare_data_reuses_the_fixture_dataset(synthetic_libero) -> None:
    root, repo_id, _ = synthetic_libero
    cfg = validate_config(compose_config("task_sequence=libero_spatial", *synthetic_overrides(root, repo_id)))
    marker = root / "cl_vla_synthetic.json"
    stamp = marker.stat().st_mtime_ns
    data, policy_cfg = prepare_data(cfg)
    assert marker.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert data.task_names == list(SPATIAL.tasks)
    assert [len(s.train_episodes) for s in data.streams] == [2] * 10
    assert policy_cfg.type == "tiny_vla"
    assert "action" in policy_cfg.output_features


def test_custom_sequence_on_local_dataset(synthetic_libero) -> None:
    tasks = [SPATIAL.tasks[9], SPATIAL.tasks[2]]
    cfg = validate_config(
        compose_config(
            *_local(synthetic_libero), "task_sequence=custom", f"task_sequence.tasks={_quoted_list(tasks)}"
        )
    )
    data, _ = prepare_data(cfg)
    assert data.task_names == tasks
    assert all(s.heldout_episodes for s in data.streams)


def test_absent_instruction_fails_in_one_line(synthetic_libero, capsys) -> None:
    absent = "pick up the purple bowl and place it on the plate"
    cfg = compose_config(
        *_local(synthetic_libero),
        "task_sequence=custom",
        f"task_sequence.tasks={_quoted_list([SPATIAL.tasks[0], absent])}",
        "dry_run=true",
    )
    with pytest.raises(DataError, match=f"Instruction '{absent}' of sequence 'custom'"):
        prepare_data(validate_config(cfg.copy()))
    with pytest.raises(SystemExit) as info:
        run_main(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert last_line(err).startswith("error: ")
    assert absent in last_line(err)
    assert "Traceback" not in err


def test_run_main_rejects_zero_steps_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run_main(compose_config("continual_learning.steps_per_task=0"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "error: continual_learning.steps_per_task=0 is not allowed; it must be a positive integer."
    ]


# ---- train.py (subprocess) ---------------------------------------------------------------------------


def _table_rows(stdout: str) -> dict[int, dict[str, str]]:
    """Rows of the rich task table: position -> {"task": full (unwrapped) text, "train": frames}."""
    rows: dict[int, dict[str, str]] = {}
    current = None
    for line in stdout.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0]:
            current = int(cells[0])
            rows[current] = {"task": cells[1], "train": cells[5]}
        elif current is not None and cells[1]:
            rows[current]["task"] += " " + cells[1]
    return rows


def test_dry_run_prints_the_task_table(synthetic_libero, capsys) -> None:
    # In this process (train.py's body): an interpreter start-up per check costs ~10 s on 2 cores.
    root, repo_id, _ = synthetic_libero
    cfg = compose_config("task_sequence=libero_spatial", "dry_run=true", *synthetic_overrides(root, repo_id))
    assert run_main(cfg) is None
    out = capsys.readouterr().out
    assert "train frames" in out
    assert "libero_spatial: 10 tasks" in out
    rows = _table_rows(out)
    assert sorted(rows) == list(range(10))
    for k, task in enumerate(SPATIAL.tasks):
        assert rows[k]["task"] == task
        assert rows[k]["train"] == "16"


@pytest.mark.parametrize(
    ("args", "headline", "also"),
    [
        (
            ["task_sequence=libero_nothing"],
            "task_sequence/libero_nothing",
            ["Available options", "libero_goal"],
        ),
        (["data.nonexistent=1"], "data.nonexistent", ["full_key: data.nonexistent"]),
        (["continual_learning.steps_per_task=abc"], "continual_learning.steps_per_task=abc", ["Integer"]),
    ],
)
def test_train_py_hydra_errors(args: list[str], headline: str, also: list[str]) -> None:
    proc = run_train(args, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    # Hydra reports composition errors itself: its message first, then its HYDRA_FULL_ERROR hint.
    assert headline in lines[0]
    for fragment in also:
        assert fragment in proc.stderr


def test_train_py_missing_dataset_root(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run_main(compose_config("data=local", "data.root=/nonexistent/dataset", "dry_run=true"))
    assert info.value.code == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith("error: ")
    assert "data.root='/nonexistent/dataset'" in line


def test_algorithm_choice_multitask() -> None:
    from cl_vla.algorithms.multitask import Multitask

    cfg = validate_config(compose_config("algorithm=multitask"))
    assert cfg.algorithm.name == "multitask"
    assert isinstance(build_algorithm(cfg.algorithm), Multitask)
