"""A tiny Hydra multirun (2 replay ratios x 2 seeds, 2 tasks, 5 steps) and its report: the report's
table matches the runs' own results.json; broken, incomplete and foreign directories are listed, not
fatal; a directory mixing two sweeps is refused, at launch and at report time."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import last_line, run_train, session_tmp, synthetic_overrides

pytestmark = pytest.mark.slow

SPEC = {"episodes_per_task": 3, "frames_per_episode": 8, "image_size": 16}
RATIOS = ("0.1", "0.5")
METRICS = {"ACC": "acc", "BWT": "bwt", "Forgetting": "forgetting"}


def _base_args(root, repo_id, tasks):
    return [
        "algorithm=er",
        "task_sequence=custom",
        "task_sequence.name=sweep2",
        "task_sequence.tasks=[" + ",".join(f"'{t}'" for t in tasks) + "]",
        f"data.root={root}",
        f"data.repo_id={repo_id}",
        *(f"data.synthetic.{k}={v}" for k, v in SPEC.items()),
        "trainer.progress_bar=false",
        "data.num_workers=0",
        "data.batch_size=8",
        "model.image_size=16",
        "trainer.warmup_steps=2",
        "continual_learning.steps_per_task=5",
    ]


@pytest.fixture(scope="module")
def sweep(synthetic_dataset_factory):
    """``(sweep_dir, base_args)`` of one finished multirun, W&B offline."""
    from cl_vla.data.task_sequences import get_task_sequence

    tasks = list(get_task_sequence("libero_spatial").tasks[:2])
    root, repo_id, _ = synthetic_dataset_factory(tasks, **SPEC)
    base = _base_args(root, repo_id, tasks)
    sweep_dir = session_tmp() / "sweep_report" / "sweep"
    proc = run_train(
        [
            "-m",
            *base,
            f"algorithm.replay_batch_ratio={','.join(RATIOS)}",
            "seed=0,1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, base


def _copy(sweep_dir: Path, dest: Path) -> Path:
    shutil.copytree(sweep_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "wandb", "report"))
    return dest


def _report(sweep_dir: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    from cl_vla.results.sweep_report import main

    code = main([str(sweep_dir), "--out", str(out), "--metric", *METRICS.values(), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _results_table(md: str) -> list[dict[str, str]]:
    section = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    head, body = split[0], split[2:]
    return [dict(zip(head, r, strict=True)) for r in body]


def _expected(sweep_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Each ratio's metric values, read from the runs' own results.json and config.resolved.yaml."""
    out: dict[str, dict[str, list[float]]] = {}
    for results in sorted(sweep_dir.glob("*/results.json")):
        cfg = yaml.safe_load((results.parent / "config.resolved.yaml").read_text())
        metrics = json.loads(results.read_text())["metrics"]
        by_metric = out.setdefault(str(cfg["algorithm"]["replay_batch_ratio"]), {})
        for m in METRICS.values():
            by_metric.setdefault(m, []).append(metrics[m])
    return out


def _check_table(md: str, expected: dict[str, dict[str, list[float]]]) -> None:
    rows = _results_table(md)
    assert [r["algorithm.replay_batch_ratio"] for r in rows] == list(RATIOS)
    for row in rows:
        ratio = row["algorithm.replay_batch_ratio"]
        assert row["runs (seed)"] == "2 (0, 1)"
        for label, m in METRICS.items():
            (cell,) = [v for k, v in row.items() if k.startswith(label + " ")]
            mean, std = (float(x) for x in cell.split("±"))
            values = expected[ratio][m]
            assert len(values) == 2
            assert mean == pytest.approx(statistics.mean(values), abs=5.1e-5)
            assert std == pytest.approx(statistics.stdev(values), abs=5.1e-5)


def test_report_table_matches_the_runs_results(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    names = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert names == [
        "0_algorithm.replay_batch_ratio=0.1,seed=0",
        "1_algorithm.replay_batch_ratio=0.1,seed=1",
        "2_algorithm.replay_batch_ratio=0.5,seed=0",
        "3_algorithm.replay_batch_ratio=0.5,seed=1",
    ]
    marker = json.loads((sweep_dir / "sweep.json").read_text())
    assert marker["swept_keys"] == ["algorithm.replay_batch_ratio", "seed"]

    code, out, err = _report(sweep_dir, tmp_path / "report", capsys)
    assert code == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    _check_table(md, _expected(sweep_dir))
    assert "0.1 | 2 (0, 1)" in out  # the table is printed too
    for png in ("metrics.png", "r_matrices.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [g["values"] for g in data["groups"]] == [{"algorithm.replay_batch_ratio": r} for r in RATIOS]
    assert "Left out" not in md


def test_wandb_run_carries_sweep_group_and_swept_values(sweep):
    from wandb.proto import wandb_internal_pb2 as pb

    from cl_vla.tracking.wandb_offline import _payloads, read_offline_run

    sweep_dir, _ = sweep
    (wb,) = (sweep_dir / "3_algorithm.replay_batch_ratio=0.5,seed=1" / "wandb").glob("offline-run-*")
    run = read_offline_run(wb)
    assert run["config"]["sweep"]["swept"] == {"algorithm.replay_batch_ratio": 0.5, "seed": 1}
    assert run["config"]["algorithm"]["replay_batch_ratio"] == 0.5
    results = json.loads((wb.parent.parent / "results.json").read_text())
    assert run["summary"]["cl/acc"] == pytest.approx(results["metrics"]["acc"])
    for payload in _payloads(next(wb.glob("run-*.wandb"))):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "run":
            assert rec.run.run_group == f"default/{sweep_dir.name}"
            assert set(rec.run.tags) >= {"sweep", "algorithm.replay_batch_ratio=0.5", "seed=1"}
            break
    else:
        pytest.fail("no run record in the offline W&B file")


def test_broken_incomplete_and_foreign_dirs_are_listed(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    expected = _expected(sweep_dir)
    d = _copy(sweep_dir, tmp_path / "sweep")
    good = d / "0_algorithm.replay_batch_ratio=0.1,seed=0"
    shutil.copytree(good, d / "4_algorithm.replay_batch_ratio=0.5,seed=2")
    (d / "4_algorithm.replay_batch_ratio=0.5,seed=2" / "results.json").write_text("{not json")
    shutil.copytree(good, d / "5_algorithm.replay_batch_ratio=0.1,seed=3")
    (d / "5_algorithm.replay_batch_ratio=0.1,seed=3" / "results.json").unlink()
    (d / "5_algorithm.replay_batch_ratio=0.1,seed=3" / "job_status.json").unlink()
    shutil.copytree(good, d / "6_algorithm.replay_batch_ratio=0.5,seed=4")
    (d / "6_algorithm.replay_batch_ratio=0.5,seed=4" / "results.json").unlink()
    (d / "6_algorithm.replay_batch_ratio=0.5,seed=4" / "job_status.json").write_text(
        json.dumps({"status": "FAILED", "error": "CUDA out of memory"})
    )
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("not a run")

    code, out, err = _report(d, tmp_path / "report", capsys)
    assert code == 0, err
    md = (tmp_path / "report" / "report.md").read_text()
    _check_table(md, expected)  # the left-out runs change nothing
    left = md.split("## Left out", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"`4_\S+`: failed — .*results.json could not be read as JSON", left)
    assert re.search(r"`5_\S+`: incomplete — no results.json", left)
    assert re.search(r"`6_\S+`: failed — the job raised: CUDA out of memory", left)
    assert re.search(r"`notes`: foreign — not a Hydra job directory", left)
    assert "left out notes: foreign" in out


def test_directory_mixing_two_sweeps_is_refused(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    d = _copy(sweep_dir, tmp_path / "sweep")
    other = d / "4_algorithm.replay_batch_ratio=0.1,seed=0"
    shutil.copytree(d / "0_algorithm.replay_batch_ratio=0.1,seed=0", other)
    ov = other / ".hydra" / "overrides.yaml"
    ov.write_text(ov.read_text().replace("steps_per_task=5", "steps_per_task=7"))
    code, _, err = _report(d, tmp_path / "report", capsys)
    assert code == 2
    assert err.count("\n") == 1 and "mixes runs of more than one sweep" in err
    assert "4_algorithm.replay_batch_ratio=0.1,seed=0" in err and "steps_per_task=7" in err

    code, _, err = _report(tmp_path / "missing", tmp_path / "r2", capsys)
    assert code == 2 and "is not a directory" in err
    code, _, err = _report(d, tmp_path / "r3", capsys, "--metric", "accuracy")
    assert code == 2 and "--metric accuracy is not a metric" in err


def test_second_sweep_into_the_same_dir_is_refused(sweep, tmp_path):
    sweep_dir, base = sweep
    d = _copy(sweep_dir, tmp_path / "sweep")
    before = sorted(p.name for p in d.iterdir())
    proc = run_train(
        ["-m", *base, "algorithm.replay_batch_ratio=0.3", "seed=0,1", "logger=none", f"hydra.sweep.dir={d}"]
    )
    assert proc.returncode == 2
    line = last_line(proc.stderr)
    assert line.startswith("error: ") and "already holds another sweep" in line
    assert "algorithm.replay_batch_ratio" in line
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None,
    reason="hydra-submitit-launcher is installed",
)
def test_slurm_launcher_without_its_plugin_fails_with_one_sentence(tmp_path):
    proc = run_train(["-m", "hydra/launcher=slurm", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}"])
    assert proc.returncode == 2
    line = last_line(proc.stderr)
    assert line.startswith("error: hydra/launcher=slurm needs Hydra's hydra-submitit-launcher plugin")
    assert "pip install -e '.[cluster]'" in line
    assert not (tmp_path / "s").exists()


def test_job_dirname_stays_short():
    from cl_vla.tracking.sweep import _dirname

    name = _dirname({"task_sequence.tasks": "['" + "x" * 400 + "']", "seed": "1"})
    assert len(name) <= 180 and "/" not in name
    assert _dirname({"data.root": "/a/b", "seed": "0"}) == "data.root=_a_b,seed=0"


def test_the_same_sweep_launched_again_continues_each_job_where_it_stopped(sweep, tmp_path):
    sweep_dir, base = sweep
    d = tmp_path / "sweep"
    shutil.copytree(sweep_dir, d, ignore=shutil.ignore_patterns("wandb", "report"))
    jobs = sorted(p for p in d.iterdir() if (p / "results.json").is_file())
    finished, cut = jobs[0], jobs[1]
    before = {p.name: json.loads((p / "results.json").read_text())["matrix"] for p in jobs}
    # One job as if killed after its first task: its results gone, its state back at task_00.ckpt.
    (cut / "results.json").unlink()
    state = json.loads((cut / "checkpoints" / "state.json").read_text())
    (cut / "checkpoints" / "state.json").write_text(json.dumps({**state, "checkpoint": "task_00.ckpt"}))
    stamp = (finished / "results.json").stat().st_mtime_ns
    proc = run_train(
        ["-m", *base, f"algorithm.replay_batch_ratio={','.join(RATIOS)}", "seed=0,1", f"hydra.sweep.dir={d}"],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished: nothing to do" in proc.stdout and "resuming" in proc.stdout
    assert (finished / "results.json").stat().st_mtime_ns == stamp  # left as it was
    for p in jobs:
        after = json.loads((p / "results.json").read_text())["matrix"]
        np.testing.assert_allclose(np.array(after, float), np.array(before[p.name], float), rtol=0, atol=1e-6)
        assert json.loads((p / "job_status.json").read_text())["status"] == "COMPLETED"


def test_sweep_with_a_refused_job_ends_in_one_summary_line(synthetic_libero, tmp_path):
    """The other jobs finish; the sweep ends with one line (how many finished and failed, which, where)
    and exit code 2, not the failed job's exception raised again as a traceback."""
    root, repo_id, _ = synthetic_libero
    d = tmp_path / "sweep"
    proc = run_train(
        [
            "-m",
            "task_sequence=libero_spatial",
            *synthetic_overrides(root, repo_id),
            "dry_run=true",
            "trainer.lr=1e-3,nan",
            f"hydra.sweep.dir={d}",
        ]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_line(proc.stderr) == (
        f"error: sweep '{d}': 1 job(s) finished, 1 failed (1_trainer.lr=nan: trainer.lr=nan is not "
        "allowed; it must be a finite number > 0.); each job's job_status.json and log say more."
    )
    status = {p.parent.name: json.loads(p.read_text())["status"] for p in d.glob("*/job_status.json")}
    assert status == {"0_trainer.lr=0.001": "COMPLETED", "1_trainer.lr=nan": "FAILED"}
