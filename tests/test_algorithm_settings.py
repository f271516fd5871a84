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
    import sys

    experiments = CONF_DIR.parent / "experiments"
    if str(experiments) not in sys.path:
        sys.path.insert(0, str(experiments))  # as when the script runs: its helpers (_ledger) import
    path = experiments / f"{name}.py"
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


# ---- the ledger: finished long runs survive the machine that ran them --------------------------------


def _finished_run(run_dir, algo: str, seed: int, acc: float, **settings) -> None:
    """A run directory as train.py leaves it finished: run.json, config.resolved.yaml, results.json."""
    import json

    cfg = compose_config("experiment=metaworld_cw", f"algorithm={algo}", f"seed={seed}")
    cfg.algorithm.update(settings)
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": "x"}))
    resolved = {"algorithm": OmegaConf.to_container(cfg.algorithm, resolve=True), "seed": seed}
    OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.resolved.yaml")
    metrics = {"acc": acc, "bwt": -0.1, "fwt": 0.2, "forgetting": 0.1, "num_tasks": 2, "tasks_learned": 2}
    (run_dir / "results.json").write_text(json.dumps({"metrics": metrics, "matrix": [[acc, 0], [0, acc]]}))


def test_finished_table_runs_are_kept_in_the_ledger_and_tabled_from_it_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(TABLE._ledger, "LEDGER_DIR", tmp_path / "ledger")
    out = tmp_path / "machine_a"
    _finished_run(out / TABLE.job_name(0, "sequential", 0), "sequential", 0, 0.2)
    _finished_run(out / TABLE.job_name(3, "er", 0), "er", 0, 0.6)
    for index, algo, seed in [(0, "sequential", 0), (3, "er", 0)]:
        TABLE.record(out / TABLE.job_name(index, algo, seed), algo)
    TABLE.record(out / TABLE.job_name(3, "er", 0), "er")  # recorded once
    assert len(TABLE._ledger.read(TABLE.NAME)) == 2
    assert TABLE.in_ledger("er", 0) and not TABLE.in_ledger("er", 1)
    # Another machine, with none of the run directories: the table still has both, and skips them.
    found, stale, _ = TABLE.collect(tmp_path / "machine_b")
    assert {a: [s for s, _ in runs] for a, runs in found.items()} == {"sequential": [0], "er": [0]}
    assert found["er"][0][1]["acc"] == 0.6 and stale == []
    # A run made with settings the experiment no longer uses is listed as stale, not tabled.
    _finished_run(tmp_path / "old" / TABLE.job_name(4, "er", 1), "er", 1, 0.9, replay_batch_ratio=0.9)
    TABLE.record(tmp_path / "old" / TABLE.job_name(4, "er", 1), "er")
    found, stale, _ = TABLE.collect(tmp_path / "machine_b")
    assert [s for s, _ in found["er"]] == [0] and len(stale) == 1 and "replay_batch_ratio" in stale[0]


def test_tuning_points_in_the_ledger_are_not_run_again_and_still_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(TUNE._ledger, "LEDGER_DIR", tmp_path / "ledger")
    sweep = tmp_path / "machine_a" / "si"
    for i, (c, acc) in enumerate([("0.1", 0.3), ("1.0", 0.5)]):
        _finished_run(sweep / str(i), "si", 0, acc, si_c=float(c))
        (sweep / str(i) / ".hydra").mkdir()
        OmegaConf.save(
            OmegaConf.create([f"algorithm.si_c={c}", "seed=0"]), sweep / str(i) / ".hydra" / "overrides.yaml"
        )
    TUNE.record("si", sweep)
    elsewhere = tmp_path / "machine_b" / "si"
    assert TUNE.pending("si", elsewhere) == [{"si_c": "10.0"}]
    rows = TUNE.results("si", elsewhere)
    assert [m["acc"] if m else None for _, m in rows] == [0.3, 0.5, None]
    assert TUNE.choose(rows) is None  # not every point has run yet


def test_a_stop_file_ends_the_stretch_before_the_next_run_and_is_removed(tmp_path, monkeypatch):
    import sys

    started = []
    monkeypatch.setattr(TABLE._ledger, "LEDGER_DIR", tmp_path / "ledger")
    monkeypatch.setattr(TABLE._driver, "offline_python", lambda: sys.executable)
    monkeypatch.setattr(TABLE, "claim_sweep", lambda out, base: None)

    def run_one(python, out, index, algo, seed, base, experiment):
        started.append((algo, seed))
        if len(started) == 2:  # someone asks for a stop while the second run is going
            (out / TABLE.STOP).touch()

    monkeypatch.setattr(TABLE, "run_one", run_one)
    out = tmp_path / "out"
    argv = ["x", "--out", str(out), "--algorithms", "sequential,er,ewc", "--seeds", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    TABLE.main()
    assert started == [("sequential", 0), ("er", 0)]
    assert not (out / TABLE.STOP).exists()  # the next invocation goes on


def test_separated_pairs_need_two_seeds_and_disjoint_spreads():
    def runs(*accs):
        return [(s, {"acc": a}) for s, a in enumerate(accs)]

    found = {
        "sequential": runs(0.20, 0.24, 0.22),
        "er": runs(0.90, 0.94, 0.92),
        "derpp": runs(0.50, 0.95, 0.80),  # wide: overlaps er, not sequential
        "ewc": runs(0.30, 0.34),
        "si": runs(0.99),  # one seed: no spread, never in a pair
    }
    assert TABLE.separated_pairs(found) == [
        ("er", "sequential"),
        ("er", "ewc"),
        ("derpp", "sequential"),
        ("derpp", "ewc"),
        ("ewc", "sequential"),
    ]
    text = TABLE.separation(found)
    assert "besides sequential (2): er > ewc, derpp > ewc" in text
    assert "against sequential (3)" in text
    assert "No two algorithms" in TABLE.separation({"er": runs(0.9)})


def test_a_point_recorded_before_a_knob_joined_the_grid_counts_as_that_knobs_default(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(TUNE._ledger, "LEDGER_DIR", tmp_path / "ledger")
    old = tmp_path / "machine_a" / "packnet"
    _finished_run(old / "0", "packnet", 0, 0.4, prune_ratio=0.75)
    (old / "0" / ".hydra").mkdir()
    OmegaConf.save(
        OmegaConf.create(["algorithm.prune_ratio=0.75", "seed=0"]), old / "0" / ".hydra" / "overrides.yaml"
    )
    assert list(TUNE.read_points(old, "packnet")) == [(("finetune_steps", "0"), ("prune_ratio", "0.75"))]
    TUNE.record("packnet", old)
    assert TUNE._ledger.read(TUNE.NAME)[0]["point"] == {"prune_ratio": "0.75", "finetune_steps": "0"}
    ledger = TUNE._ledger.LEDGER_DIR / f"{TUNE.NAME}.jsonl"
    entry = json.loads(ledger.read_text())
    del entry["point"]["finetune_steps"]  # as written before the knob joined the grid
    ledger.write_text(json.dumps(entry) + "\n")
    assert TUNE._ledger.read(TUNE.NAME)[0]["point"] == {"prune_ratio": "0.75"}
    assert TUNE.pending("packnet", tmp_path / "machine_b" / "packnet") == [
        {"prune_ratio": "0.75", "finetune_steps": "100"},
        {"prune_ratio": "0.5", "finetune_steps": "0"},
        {"prune_ratio": "0.5", "finetune_steps": "100"},
    ]


def test_a_run_with_outdated_settings_is_moved_aside_and_run_again_and_recorded_once(tmp_path, monkeypatch):
    monkeypatch.setattr(TABLE._ledger, "LEDGER_DIR", tmp_path / "ledger")
    out = tmp_path / "out"
    old = out / TABLE.job_name(3, "er", 0)
    _finished_run(old, "er", 0, 0.9, replay_batch_ratio=0.9)  # before a new tuning
    for _ in range(2):
        TABLE.record(old, "er")
    assert len(TABLE._ledger.read(TABLE.NAME)) == 1  # kept once, and out of the table
    assert TABLE.stale(old, "er") and not TABLE.finished(out, 3, "er", 0)
    calls = []
    monkeypatch.setattr(TABLE.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 1)
    TABLE.run_one("python", out, 3, "er", 0, [])
    (aside,) = out.glob(".03_algorithm=er,seed=0.stale-*")
    assert (aside / "results.json").is_file() and not (old / "results.json").exists()
    assert len(calls) == 1 and not any(a.startswith("resume=") for a in calls[0])  # a fresh run
    assert TABLE.run_dirs(out) == [] and TABLE.collect(out)[0] == {}
