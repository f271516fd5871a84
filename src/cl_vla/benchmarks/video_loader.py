"""Our training loader against lerobot's on a video dataset: ``python -m cl_vla.benchmarks.video_loader``.

Most LeRobot datasets (lerobot/libero among them) store cameras as video, and replay draws random
frames of earlier tasks, i.e. random-access decoding. This writes a synthetic LIBERO-schema dataset with
``use_videos=True`` (three tasks; lerobot's encoder), then reads training batches of the last task
through:

- **ours**: :class:`cl_vla.data.datamodule.ContinualDataModule`'s training loader (the batch sampler in
  the main process, frames decoded by the workers, ``WindowedDataset`` for the action chunk), with
  experience replay at ``replay_batch_ratio`` 0 (no replay) and 0.3 (a buffer filled from the first two
  tasks, as after ER's task ends);
- **lerobot's**: the DataLoader of ``lerobot-train`` (``LeRobotDataset`` with the policy's
  ``delta_timestamps``, ``shuffle=True``, and its defaults: ``prefetch_factor=4``, persistent
  ``spawn`` workers),

at the same batch size and number of workers, and prints samples/s of each. Rates are steady state:
timed from the first batch to the last, so worker start-up (much longer under ``spawn``) is left out;
each setting is measured ``--repeats`` times, interleaved, and the best pass kept (other processes on a
shared machine only ever slow a pass down).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

REPLAY_RATIO = 0.3
# 16 batches (~1 s a pass) and 3 passes put replay at 0.84 of no replay one day and 0.97 another on the
# same code; 48 batches and 5 passes: 1.03 (2026-12-07, 2 workers, a quiet 2-core machine).
BATCHES, REPEATS = 48, 5


def build(root: Path, episodes: int, frames: int, image_size: int, backend: str | None) -> tuple[Any, Any]:
    """``(ContinualData, policy_cfg)`` of a three-task synthetic video dataset written at ``root``."""
    from cl_vla.data.task_sequences import get_task_sequence
    from cl_vla.training.in_process import compose_run, sequence_overrides

    tasks = list(get_task_sequence("libero_spatial").tasks[:3])
    overrides = [
        "algorithm=sequential",
        "logger=none",
        *sequence_overrides("video3", tasks),
        "data.synthetic.use_videos=true",
        f"data.synthetic.episodes_per_task={episodes}",
        f"data.synthetic.frames_per_episode={frames}",
        f"data.synthetic.image_size={image_size}",
        "data.heldout_fraction=0.1",
        f"data.root={root / 'dataset'}",
    ]
    if backend:
        overrides.append(f"data.video_backend={backend}")
    _, _, data, policy_cfg = compose_run(overrides, root / "run")
    return data, policy_cfg


def ours(data: Any, replay: float, batch: int, workers: int, num_batches: int) -> DataLoader:
    """The training loader of the last task; with ``replay``, ER's buffer holds the earlier tasks."""
    from cl_vla.algorithms.base import TaskContext
    from cl_vla.algorithms.er import ReplayBuffer
    from cl_vla.data.datamodule import ContinualDataModule

    last = data.num_tasks - 1
    algorithm = ReplayBuffer(buffer_size_per_task=500, replay_batch_ratio=replay)
    for t in range(last):
        algorithm.on_task_end(
            t, TaskContext(t, data.task_names[t], data.num_tasks, train_dataset=data.train_dataset(t))
        )
    dm = ContinualDataModule(
        data,
        algorithm,
        batch_size=batch,
        eval_batch_size=batch,
        num_workers=workers,
        seed=0,
        steps_per_task=num_batches,
    )
    dm.set_task(last)
    return dm.train_dataloader()


def lerobots(data: Any, policy_cfg: Any, batch: int, workers: int, backend: str | None) -> DataLoader:
    """``lerobot-train``'s DataLoader (lerobot 0.6.1, ``scripts/lerobot_train.py``) on the same dataset."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    meta = data.dataset.meta
    dataset = LeRobotDataset(
        data.dataset.repo_id,
        root=data.dataset.root,
        delta_timestamps=resolve_delta_timestamps(policy_cfg, meta),
        video_backend=backend,
    )
    kwargs: dict[str, Any] = {}
    if workers > 0:  # TrainPipelineConfig's defaults
        kwargs = {"prefetch_factor": 4, "persistent_workers": True, "multiprocessing_context": "spawn"}
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=False, **kwargs)


def samples_per_s(make: Callable[[], Iterable[dict]], num_batches: int) -> float:
    """Samples/s of ``make()``'s loader from its first batch to the ``num_batches``-th (worker start-up
    left out); its workers are shut down before returning, so settings never overlap."""
    loader = make()
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(num_batches - 1):
        try:
            batch = next(it)
        except StopIteration:  # an epoch shorter than the pass: start the next, as lerobot-train's cycle
            it = iter(loader)
            batch = next(it)
        n += len(batch["action"])
    rate = n / (time.perf_counter() - start)
    del it, loader
    gc.collect()  # persistent workers live as long as their DataLoader
    return rate


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 20 episodes of 30 frames a task: a pass of lerobot's loader (48 batches of 32) fits in one epoch
    p.add_argument("--episodes", type=int, default=20, help="episodes per task")
    p.add_argument("--frames", type=int, default=30, help="frames per episode")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="2,4", help="comma-separated numbers of DataLoader workers")
    p.add_argument("--batches", type=int, default=BATCHES, help="batches read per measurement")
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument(
        "--backend", help="lerobot's video backend (default: torchcodec where it loads, else pyav)"
    )
    p.add_argument("--root", type=Path, help="where to write the dataset (default: a temporary folder)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = a.root or Path(tempfile.mkdtemp(prefix="cl_vla_video_bench_"))
    data, policy_cfg = build(root, a.episodes, a.frames, a.image_size, a.backend)
    backend = (
        data.dataset.base._video_backend if hasattr(data.dataset, "base") else data.dataset._video_backend
    )
    frames = sum(s.num_train_frames for s in data.streams)
    results = measure(data, policy_cfg, [int(w) for w in a.workers.split(",")], a, backend)
    print(
        f"{frames} training frames, two {a.image_size} px video cameras ({backend}), batch {a.batch}, "
        f"{a.batches} batches per pass, best of {a.repeats}:"
    )
    for line in report_lines(results):
        print("  " + line)
    return results


def measure(data: Any, policy_cfg: Any, workers: list[int], a: argparse.Namespace, backend: str) -> dict:
    """``{(loader, workers): best samples/s}`` for loader in ours (no replay), ours (replay), lerobot."""
    rates: dict[tuple[str, int], list[float]] = {}
    for rep in range(a.repeats):
        for w in workers:
            settings = {
                "ours": lambda w=w: ours(data, 0.0, a.batch, w, a.batches),
                "ours_replay": lambda w=w: ours(data, REPLAY_RATIO, a.batch, w, a.batches),
                "lerobot": lambda w=w: lerobots(data, policy_cfg, a.batch, w, backend),
            }
            # every other pass in reverse order: a loader measured right after another one's workers
            # shut down is not always the same one
            for name, make in list(settings.items())[:: 1 if rep % 2 == 0 else -1]:
                rates.setdefault((name, w), []).append(samples_per_s(make, a.batches))
    return {k: max(v) for k, v in rates.items()}


def report_lines(results: dict[tuple[str, int], float]) -> list[str]:
    """One line per number of workers: the three rates and the two ratios the issue asks for."""
    lines = []
    for w in sorted({w for _, w in results}):
        mine, replay, theirs = (results[(n, w)] for n in ("ours", "ours_replay", "lerobot"))
        lines.append(
            f"{w} workers: ours {mine:.0f}, ours with replay {REPLAY_RATIO} {replay:.0f}, lerobot's "
            f"{theirs:.0f} samples/s; ours / lerobot's {mine / theirs:.2f}, "
            f"with replay / without {replay / mine:.2f}"
        )
    return lines


if __name__ == "__main__":
    main()
