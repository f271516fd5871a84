"""Scripted-expert demonstrations of Meta-World tasks, written as one LeRobot dataset.

Each task of a sequence gets ``episodes_per_task`` successful episodes of lerobot's scripted expert for
it (an episode that has not succeeded within ``max_steps`` is dropped and the next seed is tried).
Episode k of task j is reset with a seed from ``seed, seed + 1, ...``; the seeds tried are kept in the
dataset's settings file, and closed-loop evaluation refuses seeds among them. Episodes run in worker
processes (``num_workers``, spawned, so no GL context or torch thread pool is inherited) and are
written, in a deterministic order, by this process. The dataset is cached like the synthetic one: kept
while its settings fingerprint matches, rewritten when anything that changes its content changes, and
written into a temporary sibling directory that is renamed at the end.

Frames: the observation before each action, the expert's action (clipped to [-1, 1]), the sequence's
instruction as the task; the episode ends with the step that succeeded, as lerobot's env ends it.
With ``action_noise`` > 0 the executed action is perturbed (the recorded label stays the expert's), so
the demonstrations visit states a learned policy drifts into and show how to recover (DART-style).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cl_vla.envs.metaworld import ObservationSpec, SimWorkers, check_task_names
from cl_vla.errors import ConfigError, DataError

log = logging.getLogger("cl_vla")

SETTINGS_FILE = "cl_vla_metaworld.json"
RECORDER_VERSION = 1  # bump when recorded content changes, so cached datasets are recorded again
ROBOT_TYPE = "sawyer"


@dataclass(frozen=True)
class RecordSpec:
    env_tasks: tuple[str, ...]
    instructions: tuple[str, ...]
    episodes_per_task: int = 20
    max_steps: int = 200
    cameras: tuple[str, ...] = ("corner2",)
    image_size: int = 64
    environment_state: bool = True
    fps: int = 80
    seed: int = 0
    action_noise: float = 0.0
    use_videos: bool = False
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def observation(self) -> ObservationSpec:
        return ObservationSpec(self.cameras, self.image_size, self.image_size, self.environment_state)

    def fingerprint(self) -> str:
        payload = {"recorder": RECORDER_VERSION, **asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def record_spec_for(env_tasks: Sequence[str], instructions: Sequence[str], record_cfg: Any) -> RecordSpec:
    """Check the task names and the settings of a ``data.record`` block; build the spec."""
    tasks = check_task_names(env_tasks)
    if len(tasks) != len(instructions):
        raise ConfigError(
            f"The sequence has {len(instructions)} tasks but {len(tasks)} env_tasks; "
            "they must pair one to one."
        )
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"task_sequence.env_tasks {list(env_tasks)} repeats a task; record each task once.")
    r = record_cfg
    for key, low in (("episodes_per_task", 1), ("max_steps", 1), ("fps", 1)):
        if int(r[key]) < low:
            raise ConfigError(f"data.record.{key}={r[key]} is not allowed; it must be at least {low}.")
    if int(r.max_steps) > 500:
        raise ConfigError(
            f"data.record.max_steps={r.max_steps} is not allowed; Meta-World episodes end at 500."
        )
    if not 0.0 <= float(r.action_noise) <= 1.0:
        raise ConfigError(f"data.record.action_noise={r.action_noise} is not allowed; it must be in [0, 1].")
    spec = RecordSpec(
        env_tasks=tuple(tasks),
        instructions=tuple(str(i) for i in instructions),
        episodes_per_task=int(r.episodes_per_task),
        max_steps=int(r.max_steps),
        cameras=tuple(str(c) for c in r.cameras),
        image_size=int(r.image_size),
        environment_state=bool(r.environment_state),
        fps=int(r.fps),
        seed=int(r.seed),
        action_noise=float(r.action_noise),
        use_videos=bool(r.use_videos),
        versions=_sim_versions(),
    )
    spec.observation  # noqa: B018  (validates cameras and size with one-sentence errors)
    return spec


def _sim_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("metaworld", "mujoco")}


def read_settings(root: str | Path) -> dict[str, Any] | None:
    """The settings a recorded dataset at ``root`` was made with (``None`` if it was not recorded here)."""
    marker = Path(root).expanduser() / SETTINGS_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


# ------------------------------------------------------------------------------------------- writing


def record_metaworld_dataset(
    root: str | Path,
    repo_id: str,
    spec: RecordSpec,
    *,
    num_workers: int = 2,
    progress: bool = True,
    console: Any = None,
) -> Path:
    """Record (or reuse) the demonstrations ``spec`` asks for at ``root``; returns ``root``."""
    root = Path(root).expanduser()
    fingerprint = spec.fingerprint()
    old = read_settings(root)
    if old is not None and old.get("fingerprint") == fingerprint and (root / "meta" / "info.json").is_file():
        return root
    if root.exists() and old is None and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"data.root={str(root)!r} holds files not recorded by cl_vla, so it is not overwritten; choose "
            "another data.root for data=metaworld, or data=local to read that dataset."
        )
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()  # one "Map" bar per saved episode would bury the recording's own
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    ds = LeRobotDataset.create(
        repo_id,
        fps=spec.fps,
        features=spec.observation.features(spec.use_videos),
        root=tmp,
        robot_type=ROBOT_TYPE,
        use_videos=spec.use_videos,
    )
    total = spec.episodes_per_task * len(spec.env_tasks)
    stats = _RecordStats()
    bar = _Bar(console, total) if progress else None
    try:
        with SimWorkers(spec.observation, num_workers) as workers:
            tried = _record_all(ds, spec, workers, bar, stats)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-recorded stays behind
        raise
    finally:
        if bar is not None:
            bar.stop()
    ds.finalize()
    settings = {
        "fingerprint": fingerprint,
        **asdict(spec),
        "seeds_tried": tried,
        "frames": stats.frames,
        "seconds": round(stats.seconds, 2),
    }
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    msg = (
        f"recorded {total} Meta-World demonstrations ({stats.frames} frames, {stats.failed} failed expert "
        f"episodes dropped) in {stats.seconds:.0f} s: {stats.frames / max(stats.seconds, 1e-9):.0f} frames/s "
        f"with {max(num_workers, 1)} process(es)"
    )
    (console.print if console is not None else log.info)(msg)
    return root


@dataclass
class _RecordStats:
    frames: int = 0
    failed: int = 0
    seconds: float = 0.0


def _jobs(spec: RecordSpec, need: list[int], next_seed: list[int], extra: float) -> list[tuple]:
    """Attempts for every task still short of episodes, interleaved across tasks (balances the workers)."""
    per_task = [n + (int(np.ceil(extra * n)) + 1 if n and extra > 0 else 0) for n in need]
    jobs = [
        (pos, task, next_seed[pos] + k)
        for k in range(max(per_task, default=0))
        for pos, task in enumerate(spec.env_tasks)
        if k < per_task[pos]
    ]
    for pos in range(len(spec.env_tasks)):
        next_seed[pos] += per_task[pos]
    return jobs


def _run_jobs(workers: SimWorkers, jobs: list[tuple], spec: RecordSpec):
    """Yield ``(job, frames)`` in job order, each worker running one episode at a time."""
    results: dict[int, Any] = {}
    queue = list(range(len(jobs)))[::-1]
    nxt = 0

    def feed(i: int) -> None:
        if queue:
            j = queue.pop()
            _pos, task, seed = jobs[j]
            workers.submit(i, "record", (j, task, seed, spec.max_steps, spec.action_noise))

    for i in range(workers.size):
        feed(i)
    while nxt < len(jobs):
        for i in workers.ready():
            j, _seed, frames = workers.result(i)
            results[j] = frames
            feed(i)
        while nxt in results:
            yield jobs[nxt], results.pop(nxt)
            nxt += 1


def _record_all(ds: Any, spec: RecordSpec, workers: SimWorkers, bar: Any, stats: _RecordStats) -> dict:
    n_tasks = len(spec.env_tasks)
    need = [spec.episodes_per_task] * n_tasks
    next_seed = [spec.seed] * n_tasks
    tried: list[list[int]] = [[] for _ in range(n_tasks)]
    tic = time.perf_counter()
    for attempt in range(4):
        if not any(need):
            break
        jobs = _jobs(spec, need, next_seed, extra=0.0 if attempt == 0 else 0.5)
        for (pos, _task, seed), frames in _run_jobs(workers, jobs, spec):
            tried[pos].append(seed)
            if frames is None:
                stats.failed += 1
                continue
            if need[pos] == 0:
                continue  # a spare attempt that was not needed
            _write_episode(ds, frames, spec.instructions[pos])
            stats.frames += len(frames["action"])
            need[pos] -= 1
            if bar is not None:
                bar.advance(frames=len(frames["action"]), seconds=time.perf_counter() - tic)
    stats.seconds = time.perf_counter() - tic
    for pos, missing in enumerate(need):
        if missing:
            got = spec.episodes_per_task - missing
            raise DataError(
                f"The scripted expert of {spec.env_tasks[pos]!r} succeeded in only {got} of "
                f"{len(tried[pos])} episodes within data.record.max_steps={spec.max_steps}; raise "
                "max_steps or lower action_noise."
            )
    return {task: sorted(tried[p]) for p, task in enumerate(spec.env_tasks)}


def _write_episode(ds: Any, frames: dict[str, np.ndarray], instruction: str) -> None:
    n = len(frames["action"])
    for i in range(n):
        ds.add_frame({**{k: v[i] for k, v in frames.items()}, "task": instruction})
    ds.save_episode()


class _Bar:
    def __init__(self, console: Any, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("recording Meta-World demonstrations"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("record", total=total, rate="")
        self.frames = 0
        self.progress.start()

    def advance(self, frames: int, seconds: float) -> None:
        self.frames += frames
        self.progress.update(self.task, advance=1, rate=f"{self.frames / max(seconds, 1e-9):.0f} frames/s")

    def stop(self) -> None:
        self.progress.stop()


def ensure_recorded(data_cfg: Any, sequence: Any, *, progress: bool = True, console: Any = None) -> Path:
    """Record the demonstrations ``data_cfg.record`` asks for, for ``sequence`` (cached at ``data.root``)."""
    if not sequence.env_tasks:
        raise ConfigError(
            f"data=metaworld records Meta-World tasks, but task_sequence {sequence.name!r} has no env_tasks; "
            "use a Meta-World sequence (task_sequence=mw_short or cw10) or list its env_tasks."
        )
    if any(not isinstance(t, str) for t in sequence.tasks):
        raise ConfigError(
            f"data=metaworld records instructions, but task_sequence {sequence.name!r} names tasks by index; "
            "give instruction strings."
        )
    if data_cfg.root is None:
        raise ConfigError(
            "data=metaworld needs data.root, the directory the demonstrations are recorded into."
        )
    spec = record_spec_for(sequence.env_tasks, sequence.tasks, data_cfg.record)
    return record_metaworld_dataset(
        data_cfg.root,
        data_cfg.repo_id,
        spec,
        num_workers=int(data_cfg.record.num_workers),
        progress=progress,
        console=console,
    )
