"""A Hydra sweep read from disk: its runs (``results.json`` and swept values per job directory), their
status, and the groups of runs that differ only by seed. :mod:`cl_vla.results.sweep_report` writes
the report on top of this.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cl_vla.results.run_files import RESULTS_JSON, read_results
from cl_vla.tracking.sweep import (
    JOB_STATUS,
    MARKER,
    SweepError,
    SweepSpec,
    job_overrides,
    read_marker,
    spec_from_config,
)

# Marks a report's output directory, so a later report does not read it as a run.
REPORT_TAG = ".cl_vla_report"


class ReportError(ValueError):
    """The sweep directory cannot be reported on; the message is one sentence."""


# ------------------------------------------------------------------------------------------- reading


@dataclass
class Run:
    name: str
    path: Path
    status: str  # complete | incomplete | failed | foreign | duplicate
    reason: str = ""
    overrides: dict[str, str] = field(default_factory=dict)
    config_name: str | None = None
    swept: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] | None = None

    def seed(self, key: str) -> str:
        """The run's seed: its swept value, else the one its results record."""
        if key in self.swept:
            return self.swept[key]
        seed = (self.results or {}).get("extra", {}).get(key)
        return "?" if seed is None else str(seed)

    def metric(self, name: str) -> float | None:
        if self.results is None:
            return None
        v = self.results["metrics"].get(name)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass
class Group:
    """The complete runs of one setting (equal swept values except the seed)."""

    values: tuple[tuple[str, str], ...]
    runs: list[Run]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values) or "all runs"

    def stats(self, metric: str) -> tuple[float | None, float | None, int]:
        """``(mean, sample std, n)`` over the runs where ``metric`` is defined; std is None for n < 2."""
        vals = [v for r in self.runs if (v := r.metric(metric)) is not None]
        if not vals:
            return None, None, 0
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        return float(np.mean(vals)), std, len(vals)

    def mean_matrix(self) -> np.ndarray | None:
        mats = [r.results["matrix"] for r in self.runs if r.results is not None]
        if not mats or len({m.shape for m in mats}) != 1:
            return None
        return np.mean(np.stack(mats), axis=0)


@dataclass
class Sweep:
    path: Path
    spec: SweepSpec
    spec_source: str
    runs: list[Run]
    seed_key: str = "seed"

    @property
    def complete(self) -> list[Run]:
        return [r for r in self.runs if r.status == "complete"]

    @property
    def left_out(self) -> list[Run]:
        return [r for r in self.runs if r.status != "complete"]

    @property
    def setting_keys(self) -> list[str]:
        return [k for k in self.spec.swept if k != self.seed_key]

    def groups(self) -> list[Group]:
        by: dict[tuple[tuple[str, str], ...], list[Run]] = {}
        for r in self.complete:
            key = tuple((k, r.swept.get(k, "")) for k in self.setting_keys)
            by.setdefault(key, []).append(r)
        return [Group(k, by[k]) for k in sorted(by, key=lambda k: [_sort_key(v) for _, v in k])]


def _sort_key(value: str) -> tuple[int, float, str]:
    num = as_number(value)
    return (0, num, "") if num is not None else (1, 0.0, value)


def as_number(value: str) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _job_sort_key(path: Path) -> tuple[int, str]:
    m = re.match(r"(\d+)_", path.name)
    return (int(m.group(1)) if m else 1 << 30, path.name)


def _read_job(path: Path) -> Run:
    """A job directory's overrides and config name; ``foreign`` when it is not a Hydra job."""
    from omegaconf import OmegaConf

    run = Run(path.name, path, "pending")
    ov = path / ".hydra" / "overrides.yaml"
    if not ov.is_file():
        run.status, run.reason = "foreign", "not a Hydra job directory (no .hydra/overrides.yaml)"
        return run
    try:
        lines = OmegaConf.to_container(OmegaConf.load(ov))
        if not isinstance(lines, list):
            raise ValueError("not a list")
        run.overrides = job_overrides(lines)
    except Exception as exc:
        run.status, run.reason = "foreign", f"unreadable .hydra/overrides.yaml ({str(exc).splitlines()[0]})"
        return run
    try:
        hydra_cfg = OmegaConf.load(path / ".hydra" / "hydra.yaml")
        run.config_name = str(OmegaConf.select(hydra_cfg, "hydra.job.config_name", default=None))
    except Exception:
        run.config_name = None
    return run


def _infer_spec(jobs: list[Run]) -> SweepSpec:
    """Without sweep.json or multirun.yaml: swept keys are those whose values differ between runs."""
    keys = sorted({k for r in jobs for k in r.overrides})
    swept = [k for k in keys if len({r.overrides.get(k) for r in jobs}) > 1]
    names = sorted({r.config_name for r in jobs if r.config_name}) or ["config"]
    base = tuple(sorted(f"{k}={v}" for k, v in jobs[0].overrides.items() if k not in swept))
    return SweepSpec(names[0], base, tuple(swept))


def _status(run: Run) -> None:
    """Set ``complete`` / ``incomplete`` / ``failed`` from the run's files."""
    path = run.path
    if (path / RESULTS_JSON).is_file():
        try:
            run.results = read_results(path)
        except ValueError as exc:
            run.status, run.reason = "failed", str(exc).rstrip(".")
            return
        m = run.results["metrics"]
        learned, total = m.get("tasks_learned"), m.get("num_tasks", len(run.results["task_names"]))
        if isinstance(learned, int) and learned < total:
            run.status, run.reason = "incomplete", f"results.json holds {learned} of {total} tasks"
        else:
            run.status = "complete"
        return
    job = {}
    if (path / JOB_STATUS).is_file():
        try:
            job = json.loads((path / JOB_STATUS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            job = {}
    if job.get("status") == "FAILED":
        run.status, run.reason = "failed", f"the job raised: {job.get('error') or 'unknown error'}"
        return
    if job.get("status") == "COMPLETED":
        run.status, run.reason = "failed", "the job ended without writing results.json"
        return
    state = path / "checkpoints" / "state.json"
    if state.is_file():
        try:
            st = json.loads(state.read_text(encoding="utf-8"))
            run.reason = f"no results.json; its checkpoints cover {st['task']} of {st['num_tasks']} tasks"
        except (OSError, ValueError, KeyError, TypeError):
            run.reason = "no results.json; it has checkpoints (interrupted or still running)"
    else:
        run.reason = "no results.json (still running, killed, or failed before training)"
    run.status = "incomplete"


def load_sweep(sweep_dir: str | Path, *, seed_key: str = "seed", skip: Sequence[str | Path] = ()) -> Sweep:
    """Read every job of ``sweep_dir``; raises ReportError (one sentence) for a directory it refuses."""
    from omegaconf import OmegaConf

    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; give the sweep directory of a `train.py -m` run.")
    skipped = {Path(p).resolve() for p in skip}
    try:
        spec, source = read_marker(root), MARKER
    except SweepError as exc:
        raise ReportError(str(exc)) from exc
    multirun_spec = None
    if (root / "multirun.yaml").is_file():
        try:
            multirun_spec = spec_from_config(OmegaConf.load(root / "multirun.yaml"))
        except Exception:
            multirun_spec = None
    if spec is not None and multirun_spec is not None and multirun_spec.identity != spec.identity:
        raise ReportError(
            f"{root} mixes two sweeps: the launch that wrote its multirun.yaml has "
            f"{spec.difference(multirun_spec)} (vs. its {MARKER}); give each sweep its own hydra.sweep.dir."
        )
    if spec is None and multirun_spec is not None:
        spec, source = multirun_spec, "multirun.yaml"

    runs: list[Run] = []
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=_job_sort_key):
        if d.name.startswith(".") or d.resolve() in skipped or (d / REPORT_TAG).exists():
            continue
        runs.append(_read_job(d))
    jobs = [r for r in runs if r.status == "pending"]
    if not runs:
        raise ReportError(f"{root} holds no run directories; is it the sweep directory of `train.py -m`?")
    if spec is None:
        spec, source = (_infer_spec(jobs), "inferred from the runs") if jobs else (SweepSpec("", (), ()), "")

    for r in jobs:
        r.swept = {k: r.overrides[k] for k in spec.swept if k in r.overrides}
        mine = SweepSpec(r.config_name or spec.config_name, spec.base_of(r.overrides), tuple(sorted(r.swept)))
        if mine.identity != spec.identity:
            raise ReportError(
                f"{root} mixes runs of more than one sweep: {r.name} has {spec.difference(mine)}; "
                f"give each sweep its own hydra.sweep.dir."
            )
        _status(r)

    # The same setting and seed twice (a job re-run under another number): keep the newest result.
    newest: dict[tuple[tuple[str, str], ...], Run] = {}
    for r in jobs:
        if r.status != "complete":
            continue
        key = tuple(sorted(r.swept.items()))
        old = newest.get(key)
        if old is None:
            newest[key] = r
            continue
        keep, drop = (
            (r, old)
            if (r.path / RESULTS_JSON).stat().st_mtime >= (old.path / RESULTS_JSON).stat().st_mtime
            else (old, r)
        )
        drop.status, drop.reason = "duplicate", f"same swept values as {keep.name}, which is newer"
        newest[key] = keep
    return Sweep(root, spec, source, runs, seed_key)
