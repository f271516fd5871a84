"""A run never loses or corrupts work: bad inputs and damaged or busy run directories are refused in one
sentence, with a non-zero exit, and leave every file of earlier runs as it was (digests before/after).

Bad-input kinds covered here: a damaged checkpoint, a resume that changes a fingerprinted setting
(two examples; every setting in tests/test_resume_fingerprint.py), data=local with a missing folder, a
local dataset missing a metadata file, a GPU trainer without a GPU, an output folder that cannot be
made, a run directory another process writes, a run killed before its first checkpoint (which is
restarted rather than refused), a damaged or altered digest file beside an intact checkpoint (named as
the damaged file; the checkpoint is verified by the digest state.json records), a new run into a run's
folder through train.py (refused before Hydra writes .hydra/ there), a resume whose data.root holds
another dataset, a run directory that cannot be written, a disk that fills up during a checkpoint, a
local dataset with a truncated or damaged parquet file, and held-out episodes with NaN actions.
Elsewhere: trainer values and trainer.lightning arguments (tests/test_bad_input_loop.py,
tests/test_trainer_from_config.py), a sweep with a refused job (tests/test_sweep_report.py), truncated
pretrained weights (tests/test_vla_twins.py), log continuity across a SIGKILL (tests/test_loop_e2e.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_vla.cli import run_main
from conftest import compose_config, in_process_overrides, last_line, run_train, train_in_process

pytestmark = pytest.mark.slow

STEPS = 6


def _overrides(synthetic_libero) -> list[str]:
    root, repo_id, _ = synthetic_libero
    return [
        *in_process_overrides("er", root, repo_id, "integrity2", STEPS),
        "trainer.warmup_steps=2",
        "trainer.checkpoint_every_n_steps=3",
    ]


def _resumed(overrides: list[str], out_dir: Path) -> dict:
    """Resume in this process; returns the resumed run's results.json (written in the original run dir)."""
    from cl_vla.training.in_process import run_in_process

    return run_in_process(overrides, out_dir)[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(synthetic_libero, tmp_path_factory) -> Path:
    """One uninterrupted 2-task ER run (mid-task checkpoints every 3 steps). Tests copy it before use."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    train_in_process(_overrides(synthetic_libero), run_dir)
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _refused(capsys, *overrides: str) -> str:
    """Run ``train.py``'s body in this process; it must exit 2 with one sentence. Returns the sentence."""
    with pytest.raises(SystemExit) as info:
        run_main(compose_config(*overrides))
    assert info.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _flip_inside_largest_tensor(ckpt: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor record of a torch zip checkpoint."""
    import zipfile

    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(ckpt.read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        (int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")),
    )
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + n):
        raw[i] ^= 0xFF
    ckpt.write_bytes(bytes(raw))


# ---- 2: a damaged checkpoint --------------------------------------------------------------------------


def test_flipped_checkpoint_is_refused_and_earlier_one_still_resumes(
    synthetic_libero, finished_run, run_copy, capsys, tmp_path
):
    ckpt = run_copy / "checkpoints" / "task_01.ckpt"
    _flip_inside_largest_tensor(ckpt)
    before = tree_digest(run_copy)
    line = _refused(capsys, *_overrides(synthetic_libero), f"output_dir={tmp_path / 'o'}", f"resume={ckpt}")
    assert "task_01.ckpt" in line and "damaged or altered" in line and "task_00.ckpt" in line
    assert tree_digest(run_copy) == before

    # The earlier checkpoint is intact: resuming from it ends where the uninterrupted run ended.
    resumed = _resumed(
        [*_overrides(synthetic_libero), f"resume={run_copy / 'checkpoints' / 'task_00.ckpt'}"],
        tmp_path / "o2",
    )
    ref = json.loads((finished_run / "results.json").read_text())
    np.testing.assert_allclose(np.array(resumed["matrix"]), np.array(ref["matrix"]), rtol=0, atol=1e-6)


# ---- 3: a resume that changes what is trained or evaluated ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "was", "now"),
    [
        ("model.image_size=32", "model.image_size", "16", "32"),
        ("data.heldout_fraction=0.5", "data.heldout_fraction", "0.3", "0.5"),
    ],
)
def test_resume_with_changed_setting_is_refused(
    synthetic_libero, run_copy, capsys, tmp_path, override, key, was, now
):
    before = tree_digest(run_copy)
    line = _refused(
        capsys, *_overrides(synthetic_libero), override, f"output_dir={tmp_path / 'o'}", f"resume={run_copy}"
    )
    assert f"{key}={was}" in line and f"{key}={now}" in line
    assert tree_digest(run_copy) == before


# ---- 4 / 5: local datasets -----------------------------------------------------------------------------


def test_local_dataset_folder_missing_is_refused_and_nothing_written(capsys, tmp_path):
    missing = tmp_path / "no_such_dataset"
    # experiment=smoke sets data.synthetic.*: it must not turn data=local into a synthetic dataset.
    line = _refused(
        capsys, "experiment=smoke", "data=local", f"data.root={missing}", f"output_dir={tmp_path / 'o'}"
    )
    assert str(missing) in line and "does not exist" in line
    assert not missing.exists()


def test_local_dataset_missing_tasks_parquet_is_named(synthetic_libero, capsys, tmp_path):
    root, _, _ = synthetic_libero
    damaged = tmp_path / "ds"
    shutil.copytree(root, damaged)
    (damaged / "meta" / "tasks.parquet").unlink()
    before = tree_digest(damaged)
    line = _refused(capsys, "data=local", f"data.root={damaged}", f"output_dir={tmp_path / 'o'}")
    assert "meta/tasks.parquet" in line and "hub" not in line.lower()
    assert tree_digest(damaged) == before


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_local_dataset_with_a_damaged_data_parquet_names_the_file(synthetic_libero, capsys, tmp_path, damage):
    root, _, _ = synthetic_libero
    ds = tmp_path / "ds"
    shutil.copytree(root, ds)
    target = sorted((ds / "data").glob("**/*.parquet"))[0]
    raw = bytearray(target.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # bytes flipped in the file's footer metadata
        for i in range(len(raw) - 200, len(raw) - 100):
            raw[i] ^= 0xFF
    target.write_bytes(bytes(raw))
    before = tree_digest(ds)
    line = _refused(capsys, "data=local", f"data.root={ds}", f"output_dir={tmp_path / 'o'}")
    assert f"'{target}' is truncated or damaged (" in line and "restore that file" in line, line
    assert tree_digest(ds) == before


def _nan_actions(ds: Path, episodes: set[int]) -> None:
    """Set every action of ``episodes`` to NaN in the dataset's frame parquet files (schema kept)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in sorted((ds / "data").glob("**/*.parquet")):
        table = pq.read_table(path)
        col = table.column("action").combine_chunks()
        width = col.type.list_size
        hit = np.isin(table.column("episode_index").to_numpy(), sorted(episodes))
        values = pc.list_flatten(col).to_numpy(zero_copy_only=False).reshape(-1, width).copy()
        values[hit] = np.nan
        flat = pa.array(values.reshape(-1), type=col.type.value_type)
        new = pa.FixedSizeListArray.from_arrays(flat, width)
        table = table.set_column(table.schema.get_field_index("action"), table.schema.field("action"), new)
        pq.write_table(table, path)


def test_nan_actions_in_held_out_episodes_stop_the_run_naming_task_and_episodes(
    synthetic_libero, capsys, tmp_path
):
    """A non-finite held-out score is an error naming the task and its episodes, never a NaN cell of R."""
    from cl_vla.training.in_process import compose_run

    root, _, _ = synthetic_libero
    ds = tmp_path / "ds"
    shutil.copytree(root, ds)
    args = [a if not a.startswith("data.root=") else f"data.root={ds}" for a in _overrides(synthetic_libero)]
    _, _, data, _ = compose_run(args, tmp_path / "probe")
    held_out = set(data.streams[1].heldout_episodes)  # the split does not depend on frame values
    _nan_actions(ds, held_out)
    line = _refused(capsys, *args, f"output_dir={tmp_path / 'o'}")
    eps = ", ".join(str(e) for e in sorted(held_out))
    assert line.startswith("error: Held-out evaluation of task 1 (") and f"episode(s) {eps} hold" in line
    assert "non-finite values in action" in line
    assert not (tmp_path / "o" / "results.json").exists()


def test_resume_with_data_root_at_another_dataset_is_refused_and_leaves_it_unchanged(
    synthetic_libero, run_copy, capsys, tmp_path
):
    """data.root may move on resume only to a copy of the run's dataset (checked by its meta/ digest,
    recorded in run.json); another dataset there is refused before anything reads or rewrites it."""
    from cl_vla.cli import validate_config
    from cl_vla.data.synthetic import SyntheticSpec, write_synthetic_dataset
    from cl_vla.data.task_sequences import get_task_sequence
    from cl_vla.training.run_dir import open_run

    root, repo_id, _ = synthetic_libero
    assert "dataset" in json.loads((run_copy / "run.json").read_text())
    tasks = tuple(get_task_sequence("libero_spatial").tasks[:2])
    other = write_synthetic_dataset(
        tmp_path / "other",
        repo_id,
        SyntheticSpec(tasks, episodes_per_task=2, frames_per_episode=4, image_size=8),
    )
    capsys.readouterr()  # the writer's progress bars
    before, run_before = tree_digest(other), tree_digest(run_copy)
    args = [a for a in _overrides(synthetic_libero) if not a.startswith("data.root=")]
    line = _refused(capsys, *args, f"data.root={other}", f"output_dir={tmp_path / 'o'}", f"resume={run_copy}")
    assert line == (
        f"error: data.root='{other}' holds another dataset than the one run '{run_copy}' was trained on "
        "(its meta/ differs); a resume may move data.root only to a copy of that dataset, or, with "
        "data=synthetic, to an empty folder where it is written again."
    )
    assert tree_digest(other) == before and tree_digest(run_copy) == run_before

    copy = shutil.copytree(root, tmp_path / "moved")  # a moved copy of the run's own dataset is accepted
    cfg = compose_config(*args, f"data.root={copy}", f"output_dir={tmp_path / 'o'}", f"resume={run_copy}")
    cfg = validate_config(cfg)
    assert open_run(cfg, claim=False).resume.run_dir == run_copy


# ---- 6: a GPU trainer without a GPU --------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_trainer_without_gpu_is_refused_before_any_work(capsys, tmp_path):
    data_root = tmp_path / "would_be_written"
    line = _refused(capsys, "trainer=gpu", f"data.root={data_root}", f"output_dir={tmp_path / 'o'}")
    assert "trainer.accelerator='gpu'" in line and "trainer=cpu" in line
    assert not data_root.exists()  # refused before the synthetic dataset was written


# ---- 7: an output folder that cannot be made -----------------------------------------------------------


def test_output_dir_under_a_file_is_one_sentence(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_train(["experiment=smoke", f"hydra.run.dir={blocker / 'run'}"], timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = last_line(proc.stderr)
    assert line.startswith("error: hydra.run.dir=") and "cannot be created" in line
    assert blocker.read_text() == "not a folder"


# ---- 8: two processes on one run directory -------------------------------------------------------------


def test_resume_of_a_run_another_process_writes_is_refused(synthetic_libero, run_copy, capsys, tmp_path):
    from cl_vla.training.run_dir import RunLock

    before = tree_digest(run_copy)
    held = RunLock(run_copy).acquire()  # stands for a first resume still running
    try:
        line = _refused(
            capsys, *_overrides(synthetic_libero), f"output_dir={tmp_path / 'o'}", f"resume={run_copy}"
        )
    finally:
        held.release()
    assert "being written by another cl_vla process" in line and f"pid {os.getpid()}" in line
    after = tree_digest(run_copy)
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


# ---- 9: killed before the first checkpoint -------------------------------------------------------------


class Crash(RuntimeError):
    pass


def test_run_killed_before_first_checkpoint_restarts_from_the_beginning(
    synthetic_libero, finished_run, tmp_path
):
    from cl_vla.training.in_process import run_in_process

    def crash_at_first_step(algorithm) -> None:
        def observe(batch, **kwargs):
            raise Crash("killed before the first checkpoint")

        algorithm.observe = observe

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        run_in_process(_overrides(synthetic_libero), cut, algorithm_hook=crash_at_first_step)
    assert (cut / "run.json").is_file() and not (cut / "checkpoints" / "state.json").exists()

    resumed = _resumed([*_overrides(synthetic_libero), f"resume={cut}"], tmp_path / "o")
    ref = json.loads((finished_run / "results.json").read_text())
    np.testing.assert_allclose(np.array(resumed["matrix"]), np.array(ref["matrix"]), rtol=0, atol=1e-6)


def test_resume_of_a_folder_that_is_no_run_says_so(synthetic_libero, capsys, tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    line = _refused(capsys, *_overrides(synthetic_libero), f"output_dir={tmp_path / 'o'}", f"resume={empty}")
    assert "is not a cl_vla run directory" in line


# ---- 10 / 11: a mid-task resume in a real process ------------------------------------------------------


def test_mid_task_resume_cleans_temporaries_reads_once_and_reports_run_dir(
    synthetic_libero, finished_run, run_copy, tmp_path
):
    """Resume from the mid-task checkpoint of task 1 (step 3): a stale 0-byte temporary from a kill during
    a write is removed, Lightning's 'unreliable results' warning is not shown (ours are exact), every
    Lightning line is printed once, the run directory is the last line, and R equals the original's."""
    ckpts = run_copy / "checkpoints"
    stale = ckpts / ".last.ckpt.tmp99999"
    stale.write_bytes(b"")
    proc = run_train([*_overrides(synthetic_libero), f"resume={ckpts / 'last.ckpt'}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stale.exists()
    out = proc.stdout + proc.stderr
    assert "ended before the epoch ended" not in out
    assert out.count("`Trainer.fit` stopped: `max_steps=12` reached.") == 1
    assert last_line(proc.stdout) == f"run directory: {run_copy}"
    r = json.loads((run_copy / "results.json").read_text())["matrix"]
    ref = json.loads((finished_run / "results.json").read_text())["matrix"]
    np.testing.assert_allclose(np.array(r), np.array(ref), rtol=0, atol=1e-6)


def test_resume_loads_the_checkpoint_once(synthetic_libero, run_copy, tmp_path, monkeypatch):
    import cl_vla.training.checkpointing as ckpt_mod

    loads: list[str] = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        loads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "load", counting_load)
    _resumed([*_overrides(synthetic_libero), f"resume={run_copy / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    assert [Path(p).name for p in loads] == ["last.ckpt"]


def test_checkpoint_write_is_durable_and_digested(tmp_path, monkeypatch):
    from cl_vla.training.checkpointing import file_sha256, recorded_digests, write_checkpoint

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "x.ckpt"
    write_checkpoint({"w": torch.arange(10.0), "cl_vla": {"state": "{}"}}, path)
    # The file, the sidecar (twice) and the folder after each rename.
    assert len(synced) >= 4
    assert recorded_digests(path) == [file_sha256(path)]
    assert not list(tmp_path.glob(".*tmp*"))


def test_new_run_into_an_existing_run_folder_is_refused(synthetic_libero, run_copy, capsys):
    before = tree_digest(run_copy)
    line = _refused(capsys, *_overrides(synthetic_libero), f"output_dir={run_copy}")
    assert "already holds a cl_vla run" in line and f"resume='{run_copy}'" in line
    assert tree_digest(run_copy) == before


def test_train_py_new_run_into_a_run_folder_writes_nothing(run_copy):
    """Refused before Hydra writes .hydra/ (config.yaml, overrides.yaml, hydra.yaml) into the folder: a
    finished run's folder keeps recording its own configuration, byte for byte."""
    (run_copy / ".hydra").mkdir()
    (run_copy / ".hydra" / "overrides.yaml").write_text("- algorithm=er\n")
    before = tree_digest(run_copy)
    proc = run_train(["experiment=smoke", "algorithm=ewc", f"hydra.run.dir={run_copy}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds a cl_vla run" in last_line(proc.stderr)
    assert tree_digest(run_copy) == before


def test_truncated_checkpoint_without_digest_is_called_corrupt(finished_run, tmp_path, capsys):
    """A checkpoint from before digests existed (no sidecar) is still checked by loading it."""
    from cl_vla.training.checkpointing import CheckpointError, digest_path, read_checkpoint

    ckpt = tmp_path / "task_00.ckpt"
    good = (finished_run / "checkpoints" / "task_00.ckpt").read_bytes()
    ckpt.write_bytes(good[: len(good) // 3])
    assert not digest_path(ckpt).exists()
    with pytest.raises(CheckpointError, match="is corrupt or not a cl_vla checkpoint"):
        read_checkpoint(ckpt)
    assert "has no .sha256 digest" in capsys.readouterr().err


# ---- a damaged digest file: the sidecar is named, its intact checkpoint still verified -----------------


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_sidecar_is_named_and_its_checkpoint_verified_by_state_json(
    synthetic_libero, run_copy, capsys, tmp_path, damage
):
    from cl_vla.training.checkpointing import digest_path, state_digest
    from cl_vla.training.run_dir import resolve_resume

    ckpt = run_copy / "checkpoints" / "task_01.ckpt"
    side = digest_path(ckpt)
    side.write_text("" if damage == "empty" else side.read_text()[:20])
    assert state_digest(ckpt) is not None  # state.json holds every checkpoint's digest
    before = tree_digest(run_copy)
    point = resolve_resume(str(ckpt))  # verified by state.json's record, not refused
    assert point.ckpt == ckpt and point.state.task == 2
    err = capsys.readouterr().err
    assert "task_01.ckpt.sha256 is damaged" in err and "matches the digest state.json recorded" in err
    assert tree_digest(run_copy) == before

    # Without the second record: one sentence naming the sidecar, not "resume from an earlier one".
    state = json.loads((run_copy / "checkpoints" / "state.json").read_text())
    del state["digests"]
    (run_copy / "checkpoints" / "state.json").write_text(json.dumps(state))
    line = _refused(capsys, *_overrides(synthetic_libero), f"output_dir={tmp_path / 'o'}", f"resume={ckpt}")
    assert "task_01.ckpt.sha256' is damaged" in line and "not known to be damaged" in line
    assert "resume from an earlier one" not in line


def test_altered_sidecar_with_intact_checkpoint_is_not_called_damaged(run_copy, capsys):
    from cl_vla.training.checkpointing import digest_path, verify_checkpoint

    ckpt = run_copy / "checkpoints" / "task_00.ckpt"
    digest_path(ckpt).write_text("0" * 64 + "  task_00.ckpt\n")
    verify_checkpoint(ckpt)
    assert "the digest file was altered, not the checkpoint" in capsys.readouterr().err


def test_read_only_run_directory_is_one_sentence(synthetic_libero, run_copy, capsys, tmp_path, monkeypatch):
    """A resume into a run directory it cannot write (read-only mount, another user's) is one sentence,
    not an OSError traceback on .lock. (Simulated: tests run as root, whom chmod does not stop.)"""
    import errno

    import cl_vla.training.run_dir as run_dir_mod

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(run_dir_mod, "open", read_only, raising=False)
    before = tree_digest(run_copy)
    line = _refused(
        capsys, *_overrides(synthetic_libero), f"output_dir={tmp_path / 'o'}", f"resume={run_copy}"
    )
    assert line == (
        f"error: Run directory '{run_copy}' cannot be written (Permission denied); make it writable or "
        "resume a writable copy of it."
    )
    assert tree_digest(run_copy) == before


def test_disk_full_while_writing_a_checkpoint_says_so_and_keeps_the_last_one(run_copy, monkeypatch):
    """torch.save turns ENOSPC into "unexpected pos"; the sentence names the real cause, the partial file
    is removed, and the checkpoint that was there is still verified."""
    import errno
    import io

    import cl_vla.training.checkpointing as ck

    ckpt = run_copy / "checkpoints" / "last.ckpt"
    before = tree_digest(run_copy)
    payload = torch.load(ckpt, map_location="cpu", weights_only=True)

    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() + len(b) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(ck, "open", lambda p, mode: FullDisk(p, mode.replace("b", "")), raising=False)
    with pytest.raises(ck.CheckpointError) as info:
        ck.write_checkpoint(payload, ckpt)
    assert str(info.value) == (
        f"Writing checkpoint '{ckpt}' failed (No space left on device); the checkpoints already written are "
        f"intact: free space (or fix the folder) and continue with resume='{run_copy}'."
    )
    assert tree_digest(run_copy) == before  # no partial file, the old checkpoint and its digest unchanged
    ck.verify_checkpoint(ckpt)


# ---- found in review ----------------------------------------------------------------------------------


def test_lock_on_a_file_system_without_flock_warns_and_runs(tmp_path, monkeypatch):
    import errno

    import cl_vla.training.run_dir as run_dir_mod

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir_mod.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="file system without flock"):
        lock = run_dir_mod.RunLock(tmp_path).acquire()
    lock.release()


def test_state_json_without_a_checkpoint_is_one_sentence(run_copy):
    from cl_vla.training.checkpointing import CheckpointError
    from cl_vla.training.run_dir import resolve_resume

    (run_copy / "checkpoints" / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="names no checkpoint"):
        resolve_resume(str(run_copy))


def test_memory_plan_rule_follows_ewc_mode_and_names_unknown_algorithms():
    from cl_vla.training.memory_plan import rule_name

    assert rule_name("ewc", {"mode": "online"}) == "ewc_online"
    assert rule_name("ewc_online", {"mode": "separate"}) == "ewc"
    with pytest.warns(UserWarning, match="no cost rule for algorithm='my_new_method'"):
        assert rule_name("my_new_method", {}) == "sequential"


def test_bad_normalization_mode_is_one_sentence():
    from cl_vla.errors import ConfigError
    from cl_vla.policies.configs import build_policy_config

    with pytest.raises(ConfigError, match=r"model.normalization_mapping.ACTION='bogus' is not allowed"):
        build_policy_config({"type": "tiny_vla", "normalization_mapping": {"ACTION": "bogus"}}, None)


def test_sim_evaluation_of_a_cross_dataset_sequence_is_refused():
    from cl_vla.cli import validate_config
    from cl_vla.errors import ConfigError

    with pytest.raises(ConfigError, match="eval=sim is not available yet"):
        validate_config(compose_config("task_sequence=cross_demo", "eval=sim"))
