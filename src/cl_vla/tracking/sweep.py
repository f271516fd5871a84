"""Sweep bookkeeping shared by Hydra at launch, the W&B logger in each job and the sweep report
(``cl_vla.results.sweep_report``).

A Hydra multirun (``python train.py -m ...``) writes one directory per sweep (``hydra.sweep.dir``) with
one subdirectory per job. :class:`SweepGuard` (a Hydra callback, see ``conf/config.yaml``) adds:

* ``sweep.json`` in the sweep directory: the sweep's identity (config name, base overrides, swept
  keys). It is created atomically when the sweep starts; a second sweep with another identity that
  is launched into the same directory is refused with one sentence. Re-running the same command
  (e.g. to add seeds) is allowed.
* ``job_status.json`` in each job directory: COMPLETED or FAILED (with the error's first line), so a
  report can tell a failed run from one that is still running.
* a clear sentence when ``hydra/launcher`` or ``hydra/sweeper`` names a plugin that is not installed.

The ``cl_vla.swept`` resolver names job directories by their swept values only (``0_seed=1,...``),
instead of Hydra's ``override_dirname`` of every override, which overflows file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cl_vla.errors import CLVLAError

MARKER = "sweep.json"
JOB_STATUS = "job_status.json"
#: Overrides that never make two sweeps different (resuming a run, Hydra's own bookkeeping).
IGNORED_KEYS = frozenset({"resume", "output_dir", "seed_everything"})
#: pip names of the optional Hydra plugins our configs use, with the extra that installs them.
PLUGIN_EXTRAS = {"hydra-submitit-launcher": "cluster"}
_MAX_DIRNAME = 180


class SweepError(ValueError):
    """A sweep directory that cannot be used or read; the message is one sentence."""


# ------------------------------------------------------------------------------------------- overrides


def parse_overrides(lines: Iterable[str]) -> list[Any]:
    """Hydra ``Override`` objects of ``lines`` (raises Hydra's error on a malformed line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(x) for x in lines])


def override_key(o: Any) -> str:
    """The key of an override without its ``+``/``++``/``~`` prefix (``group@pkg`` for packages)."""
    return o.key_or_group if o.package is None else f"{o.key_or_group}@{o.package}"


def override_line(o: Any) -> str:
    """A normalized ``key=value`` line, equal for the command line's and a job's form of one override."""
    return f"{o.get_key_element()}={o.get_value_element_as_str()}"


def job_overrides(lines: Iterable[str]) -> dict[str, str]:
    """``{key: value string}`` of one job's (non-sweep) overrides."""
    return {override_key(o): o.get_value_element_as_str() for o in parse_overrides(lines)}


@dataclass(frozen=True)
class SweepSpec:
    """What makes a sweep: its config, the overrides every job shares, and the keys it varies."""

    config_name: str
    base: tuple[str, ...]
    swept: tuple[str, ...]

    @property
    def identity(self) -> str:
        blob = json.dumps([self.config_name, list(self.base), list(self.swept)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "config_name": self.config_name,
            "base_overrides": list(self.base),
            "swept_keys": list(self.swept),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SweepSpec:
        return cls(
            str(data["config_name"]),
            tuple(str(x) for x in data["base_overrides"]),
            tuple(str(x) for x in data["swept_keys"]),
        )

    def base_of(self, overrides: Mapping[str, str]) -> tuple[str, ...]:
        """A job's overrides minus the swept and ignored keys, in the form of :attr:`base`."""
        return tuple(
            sorted(f"{k}={v}" for k, v in overrides.items() if k not in self.swept and k not in IGNORED_KEYS)
        )

    def difference(self, other: SweepSpec) -> str:
        """A short phrase saying how ``other`` differs from this sweep (for error sentences)."""
        parts = []
        if other.config_name != self.config_name:
            parts.append(f"config {other.config_name!r} instead of {self.config_name!r}")
        if other.swept != self.swept:
            parts.append(f"swept keys {list(other.swept)} instead of {list(self.swept)}")
        only_other = sorted(set(other.base) - set(self.base))
        only_self = sorted(set(self.base) - set(other.base))
        if only_other or only_self:
            parts.append(f"base overrides {only_other} instead of {only_self}")
        return "; ".join(parts) or "the same settings"


def spec_from_config(cfg: DictConfig) -> SweepSpec:
    """The spec of a multirun from its primary config (as in ``on_multirun_start`` or ``multirun.yaml``)."""
    lines = list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or [])
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    swept: set[str] = set()
    base: dict[str, str] = {}  # by key: a key given twice counts once, with its last value (as in Hydra)
    for o in parse_overrides(lines):
        key = override_key(o)
        if o.is_sweep_override():
            swept.add(key)
            base.pop(key, None)
        elif key not in IGNORED_KEYS:
            swept.discard(key)
            base[key] = override_line(o)
    if isinstance(params, DictConfig):
        # Sweep parameters from the config (BasicSweeper's and Optuna's `hydra.sweeper.params`).
        swept.update(str(k) for k in params)
    base_lines = [line for key, line in base.items() if key not in swept]
    config_name = str(OmegaConf.select(cfg, "hydra.job.config_name", default="config") or "config")
    return SweepSpec(config_name, tuple(sorted(base_lines)), tuple(sorted(swept)))


def read_marker(sweep_dir: Path) -> SweepSpec | None:
    """The spec in ``sweep_dir/sweep.json``, ``None`` without one; raises SweepError if it is unreadable."""
    path = Path(sweep_dir) / MARKER
    if not path.is_file():
        return None
    try:
        return SweepSpec.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SweepError(
            f"{path} is not a valid sweep marker ({exc}); remove it or use another dir."
        ) from exc


def _has_runs(sweep_dir: Path) -> bool:
    return any((p / ".hydra").is_dir() for p in sweep_dir.iterdir() if p.is_dir())


def claim(sweep_dir: str | os.PathLike[str], spec: SweepSpec) -> None:
    """Record ``spec`` as the sweep of ``sweep_dir``; raise SweepError if another sweep owns it.

    A marker left by a launch that never started a job (e.g. Hydra rejected a key) is replaced.
    """
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / MARKER
    payload = {**spec.to_json(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:]}
    text = json.dumps(payload, indent=2) + "\n"
    for _ in range(2):
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
            return
        except FileExistsError:
            pass
        old = read_marker(sweep_dir)
        if old is not None and old.identity == spec.identity:
            return
        if _has_runs(sweep_dir):
            assert old is not None
            raise SweepError(
                f"{sweep_dir} already holds another sweep (this one has {old.difference(spec)}); "
                f"give each sweep its own hydra.sweep.dir."
            )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: no job of that sweep ever started
    raise SweepError(f"{path} could not be created; another sweep is starting in the same directory.")


def check_unclaimed_dir(sweep_dir: Path, spec: SweepSpec) -> None:
    """A sweep directory without a marker but with runs (an older sweep) must be of the same sweep."""
    multirun = sweep_dir / "multirun.yaml"
    if read_marker(sweep_dir) is not None or not multirun.is_file() or not _has_runs(sweep_dir):
        return
    old = spec_from_config(OmegaConf.load(multirun))
    if old.identity != spec.identity:
        raise SweepError(
            f"{sweep_dir} already holds another sweep (this one has {old.difference(spec)}); "
            f"give each sweep its own hydra.sweep.dir."
        )


# --------------------------------------------------------------------------------------- job side


_MARKER_CACHE: dict[str, SweepSpec | None] = {}


def _marker_cached(sweep_dir: str) -> SweepSpec | None:
    if sweep_dir not in _MARKER_CACHE:
        try:
            _MARKER_CACHE[sweep_dir] = read_marker(Path(sweep_dir))
        except SweepError:
            _MARKER_CACHE[sweep_dir] = None
    return _MARKER_CACHE[sweep_dir]


def swept_values(overrides: Iterable[str], sweep_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    """A job's swept ``{key: value}`` (from its overrides and the sweep's marker); ``None`` without one."""
    spec = _marker_cached(str(sweep_dir))
    if spec is None:
        return None
    values = job_overrides(overrides)
    return {k: values[k] for k in spec.swept if k in values}


def _dirname(items: Mapping[str, str]) -> str:
    name = ",".join(f"{k}={v}" for k, v in sorted(items.items())).replace("/", "_").replace(os.sep, "_")
    if len(name) > _MAX_DIRNAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_DIRNAME - 11]}~{digest}"
    return name


def _swept_dirname(*, _root_: DictConfig) -> str:
    """Resolver ``${cl_vla.swept:}``: the job's swept ``key=value`` pairs, for its directory name."""
    lines = list(OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or [])
    sweep_dir = OmegaConf.select(_root_, "hydra.sweep.dir", default=None)
    exclude = set(
        OmegaConf.select(_root_, "hydra.job.config.override_dirname.exclude_keys", default=[]) or []
    )
    values = swept_values(lines, sweep_dir) if sweep_dir else None
    if values is None:  # no marker (callback disabled): every override, as Hydra's override_dirname
        values = job_overrides(lines)
    return _dirname({k: v for k, v in values.items() if k not in exclude}) or "run"


OmegaConf.register_new_resolver("cl_vla.swept", _swept_dirname, replace=True)


@dataclass(frozen=True)
class JobSweepInfo:
    """What one multirun job tells W&B about its sweep."""

    group: str
    sweep_dir: str
    job_num: int
    swept: dict[str, Any]

    @property
    def tags(self) -> list[str]:
        return ["sweep", *(f"{k}={v}"[:64] for k, v in self.swept.items())]

    def config(self) -> dict[str, Any]:
        return {"dir": self.sweep_dir, "group": self.group, "job_num": self.job_num, "swept": self.swept}


def current_job_sweep(cfg: DictConfig) -> JobSweepInfo | None:
    """The sweep of the running Hydra multirun job, ``None`` outside one (plain runs, tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        sweep_dir = str(Path(hc.sweep.dir).resolve())
        num = int(hc.job.num)
        lines = list(hc.overrides.task)
    except Exception:
        return None
    raw = swept_values(lines, sweep_dir) or {}
    swept: dict[str, Any] = {}
    for k, v in raw.items():
        # The typed value (0.1, not "0.1") so W&B plots it on a numeric axis; group choices stay strings.
        typed = OmegaConf.select(cfg, k, default=None) if "@" not in k else None
        swept[k] = typed if isinstance(typed, int | float | str | bool) else v
    name = OmegaConf.select(cfg, "experiment.name", default="sweep")
    return JobSweepInfo(f"{name}/{Path(sweep_dir).name}"[:128], sweep_dir, num, swept)


# ---------------------------------------------------------------------------------------- callback


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_output_dir(path: str, key: str) -> None:
    """One sentence (exit 2) instead of Hydra's traceback when the output folder cannot be made."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        why = exc.strerror or str(exc)
        _fail(f"{key}={path!r} cannot be created or written ({why}); choose a writable folder: {key}=<dir>.")


def check_plugins(cfg: DictConfig) -> None:
    """One sentence (exit 2) when the chosen launcher or sweeper is a plugin that is not installed."""
    for node in ("launcher", "sweeper"):
        target = OmegaConf.select(cfg, f"hydra.{node}._target_", default=None)
        if not isinstance(target, str) or not target.startswith("hydra_plugins."):
            continue
        package = ".".join(target.split(".")[:2])
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            continue
        pip_name = package.split(".")[1].replace("_", "-")
        choice = OmegaConf.select(cfg, f"hydra.runtime.choices.hydra/{node}", default=node)
        extra = PLUGIN_EXTRAS.get(pip_name)
        how = (
            f"`pip install -e '.[{extra}]'` (or `pip install {pip_name}`)"
            if extra
            else f"`pip install {pip_name}`"
        )
        _fail(
            f"hydra/{node}={choice} needs Hydra's {pip_name} plugin, which is not installed; "
            f"install it with {how}."
        )


def sweep_summary(sweep_dir: Path, listed: int = 3) -> str | None:
    """One line for the end of a sweep with failed jobs: how many of its jobs finished and failed, and
    which failed (from their ``job_status.json``); None when no job of ``sweep_dir`` failed."""
    done, failed = 0, []
    for job in sorted(p for p in sweep_dir.glob(f"*/{JOB_STATUS}")):
        try:
            status = json.loads(job.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if status.get("status") == "COMPLETED":
            done += 1
        elif status.get("status") == "FAILED":
            failed.append(f"{job.parent.name}: {status.get('error') or 'unknown error'}")
    if not failed:
        return None
    shown = "; ".join(failed[:listed]) + (
        f"; and {len(failed) - listed} more" if len(failed) > listed else ""
    )
    return (
        f"sweep {str(sweep_dir)!r}: {done} job(s) finished, {len(failed)} failed ({shown}); "
        f"each job's {JOB_STATUS} and log say more."
    )


def _basic_sweeper(config: DictConfig) -> bool:
    target = OmegaConf.select(config, "hydra.sweeper._target_", default="")
    return str(target).endswith(".BasicSweeper")


class SweepGuard(Callback):
    """Hydra callback: claims the sweep directory, records job status, checks plugins (see module doc)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_dir(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_plugins(config)
        spec = spec_from_config(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        check_output_dir(str(sweep_dir), "hydra.sweep.dir")
        try:
            if sweep_dir.is_dir():
                check_unclaimed_dir(sweep_dir, spec)
            claim(sweep_dir, spec)
        except SweepError as exc:
            _fail(str(exc))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        mode = OmegaConf.select(config, "hydra.mode", default=None)
        if getattr(mode, "name", str(mode)) != "MULTIRUN":
            return
        out = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if not out:
            return
        status = getattr(job_return.status, "name", str(job_return.status))
        error = None
        if status == "FAILED":
            exc = job_return._return_value
            error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        payload = {"status": status, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with contextlib.suppress(OSError):
            tmp = Path(out) / f".{JOB_STATUS}.tmp"
            tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
            os.replace(tmp, Path(out) / JOB_STATUS)
        if status == "FAILED" and isinstance(exc, CLVLAError) and _basic_sweeper(config):
            # Already one sentence on stderr and FAILED in job_status.json. Hydra's basic sweeper would
            # raise it again once every job has run, as a traceback; on_multirun_end sums the sweep up
            # in one line instead. (Other sweepers, e.g. Optuna, need the failure: they get it.)
            from hydra.core.utils import JobStatus

            job_return.status, job_return.return_value = JobStatus.COMPLETED, None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = sweep_summary(Path(str(config.hydra.sweep.dir)))
        if summary is not None:
            _fail(summary)
