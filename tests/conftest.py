"""Shared fixtures: an offline, sandboxed environment and small synthetic LeRobot datasets.

The environment is set when this module is imported, before any test module imports lerobot,
huggingface_hub or datasets (some of them read their settings at import time). Everything a test
writes goes under one session temporary directory, removed at the end of the session.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="cl_vla_tests_"))
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)

TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "MUJOCO_GL": "egl",
    # Generated datasets and recordings never land in the user's cache.
    "CL_VLA_CACHE": str(_SESSION_TMP / "cache"),
    # The `datasets` library caches what it loads; keep that out of ~/.cache too.
    "HF_DATASETS_CACHE": str(_SESSION_TMP / "hf_datasets"),
    "WANDB_DIR": str(_SESSION_TMP / "wandb"),
    "HYDRA_FULL_ERROR": "0",
}
os.environ.update(TEST_ENV)

# The fixture dataset: LIBERO-Spatial's 10 instructions, tiny frames.
SYNTHETIC_SETTINGS = {"episodes_per_task": 3, "frames_per_episode": 8, "image_size": 16}
SYNTHETIC_REPO_ID = "cl_vla_tests/synthetic_libero_spatial"


def session_tmp() -> Path:
    return _SESSION_TMP


def synthetic_overrides(root: str | Path, repo_id: str) -> list[str]:
    """Hydra overrides under which `data=synthetic` reuses the `synthetic_libero` fixture dataset.

    Only valid with `task_sequence=libero_spatial`: another sequence would rewrite the dataset.
    """
    return [
        f"data.root={root}",
        f"data.repo_id={repo_id}",
        *(f"data.synthetic.{k}={v}" for k, v in SYNTHETIC_SETTINGS.items()),
    ]


def in_process_overrides(
    algo: str, root: str | Path, repo_id: str, name: str, steps: int, model: str = "tiny_vla"
) -> list[str]:
    """Overrides for an in-process run (``cl_vla.training.in_process.compose_run``) of ``algo`` on
    LIBERO-Spatial's first two instructions of the fixture dataset: batch 4, 16 px, no workers, no logger.

    ``model``: ``tiny_vla`` (16 px) or a tiny twin of a hub VLA (``smolvla_tiny``...: its own
    image size, the held-out evaluation cut to 2 batches a task)."""
    from cl_vla.data.task_sequences import get_task_sequence
    from cl_vla.training.in_process import sequence_overrides

    return [
        f"algorithm={algo}",
        *sequence_overrides(name, list(get_task_sequence("libero_spatial").tasks[:2])),
        f"data.root={root}",
        f"data.repo_id={repo_id}",
        "data.synthetic=null",
        "data.num_workers=0",
        "data.batch_size=4",
        *(["model.image_size=16"] if model == "tiny_vla" else [f"model={model}", "eval.max_batches=2"]),
        f"continual_learning.steps_per_task={steps}",
        "trainer.progress_bar=false",
        "logger=none",
    ]


def compose_config(*overrides: str):
    """``conf/`` composed with ``overrides`` as train.py would (no Hydra run: output_dir unset)."""
    from hydra import compose, initialize_config_dir

    from cl_vla.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's own process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_ranks(ctx, tmp_path: Path, timeout_s: float) -> None:
    """Wait for ``torch.multiprocessing.start_processes(..., join=False)`` ranks; fail the test with each
    rank's ``error_*.txt`` (written by the rank) when one raised, or after ``timeout_s``."""
    import time

    import torch.multiprocessing as mp

    deadline = time.time() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                pytest.fail(
                    f"the DDP ranks did not finish within {timeout_s:.0f} s (a collective on one rank only?)"
                )
    except mp.ProcessRaisedException:
        errors = sorted(tmp_path.glob("error_*.txt"))
        pytest.fail("\n".join(f"{e.name}:\n{e.read_text()[-2000:]}" for e in errors) or "a rank failed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def run_train(
    args: Sequence[str],
    cwd: str | Path = REPO_ROOT,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python train.py *args`` with the test environment; returns the finished process.

    Unless ``args`` set them, Hydra's run and sweep directories go to a fresh temporary directory,
    so no test writes ``outputs/`` or ``multirun/`` into the repository.
    """
    args = [str(a) for a in args]
    run_dir = Path(tempfile.mkdtemp(prefix="run_", dir=_SESSION_TMP))
    if not any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir / 'run'}")
    if not any(a.lstrip("+").startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={run_dir / 'multirun'}")
    full_env = {**os.environ, **TEST_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        cwd=str(cwd),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def synthetic_dataset_factory() -> Callable[..., tuple[Path, str, object]]:
    """``make(instructions, **spec_kwargs) -> (root, repo_id, spec)``: a small synthetic dataset.

    Datasets are written once per distinct spec (keyed by its fingerprint) and shared by the session.
    Tests must not modify them; copy one first (``shutil.copytree``) to damage it.
    """
    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset

    def make(instructions: Sequence[str], **kwargs) -> tuple[Path, str, SyntheticSpec]:
        spec = SyntheticSpec(instructions=tuple(instructions), **kwargs)
        fp = spec.fingerprint()
        root = _SESSION_TMP / "datasets" / f"synthetic_{fp}"
        repo_id = f"cl_vla_tests/synthetic_{fp}"
        write_synthetic_dataset(root, repo_id, spec)
        return root, repo_id, spec

    return make


@pytest.fixture(scope="session")
def synthetic_libero(synthetic_dataset_factory) -> tuple[Path, str, object]:
    """``(root, repo_id, spec)`` of one synthetic dataset with LIBERO-Spatial's 10 instructions."""
    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from cl_vla.data.task_sequences import get_task_sequence

    spec = SyntheticSpec(instructions=tuple(get_task_sequence("libero_spatial").tasks), **SYNTHETIC_SETTINGS)
    root = _SESSION_TMP / "datasets" / "synthetic_libero_spatial"
    write_synthetic_dataset(root, SYNTHETIC_REPO_ID, spec)
    return root, SYNTHETIC_REPO_ID, spec


def train_in_process(overrides: Sequence[str], run_dir: Path) -> dict:
    """What ``train.py <overrides>`` does, in this process (no interpreter start-up: seconds a run on
    a 2-core machine), writing into ``run_dir``; returns its ``results.json``."""
    from cl_vla.training.in_process import run_in_process

    run_in_process(list(overrides), run_dir)
    return json.loads((run_dir / "results.json").read_text())


def two_task_run(algo: str, synthetic_libero, run_dir: Path, *extra: str) -> tuple[dict, dict]:
    """A run of ``algorithm=<algo>`` on LIBERO-Spatial's first two instructions, 5 steps each.

    Asserts it wrote a 2x2 matrix; returns ``(results.json, task_01.ckpt)`` so a test can check what
    the algorithm saved after a real run.
    """
    import torch

    root, repo_id, _ = synthetic_libero
    overrides = in_process_overrides(algo, root, repo_id, f"{algo}2", steps=5)
    results = train_in_process([*overrides, "trainer.warmup_steps=2", *extra], run_dir)
    assert results["extra"]["algorithm"] == algo and len(results["matrix"]) == 2
    ckpt = torch.load(run_dir / "checkpoints" / "task_01.ckpt", map_location="cpu", weights_only=True)
    return results, ckpt
