"""LIBERO's datasets as users download them: codebase versions, schemas, image sizes (no hub needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cl_vla.errors import DataError


def _info(root: Path, version: str) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": version, "fps": 20}))
    return root


def test_an_unconverted_v21_folder_names_lerobots_converter_in_one_sentence(tmp_path: Path) -> None:
    from cl_vla.data.streams import V21_CONVERTER, open_dataset

    root = _info(tmp_path / "libero_10_no_noops_1.0.0_lerobot", "v2.1")
    with pytest.raises(DataError) as info:
        open_dataset("IPEC-COMMUNITY/libero_10_no_noops_1.0.0_lerobot", root)
    msg = str(info.value)
    assert "\n" not in msg and "LeRobot v2.1 dataset" in msg and "codebase v3.0 only" in msg
    assert f"python -m {V21_CONVERTER} --repo-id=IPEC-COMMUNITY/libero_10_no_noops_1.0.0_lerobot" in msg
    assert f"--root={root} --push-to-hub=false" in msg


def test_the_converter_the_message_names_is_lerobots_module_with_those_flags() -> None:
    from cl_vla.data.streams import V21_CONVERTER

    spec = importlib.util.find_spec(V21_CONVERTER)
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    assert all(f'"{flag}"' in source for flag in ("--repo-id", "--root", "--push-to-hub"))


def test_an_unconverted_v21_set_from_the_hub_cache_is_one_sentence(monkeypatch) -> None:
    import packaging.version
    from lerobot.datasets import lerobot_dataset
    from lerobot.datasets.utils import BackwardCompatibilityError

    from cl_vla.data.streams import V21_CONVERTER, open_dataset

    def old(repo_id, **_kwargs):  # what lerobot 0.6.1 raises for a v2.1 dataset it fetched
        raise BackwardCompatibilityError(repo_id, packaging.version.parse("v2.1"))

    monkeypatch.setattr(lerobot_dataset, "LeRobotDataset", old)
    with pytest.raises(DataError) as info:
        open_dataset("IPEC-COMMUNITY/libero_spatial_no_noops_1.0.0_lerobot", None)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(
        "Dataset 'IPEC-COMMUNITY/libero_spatial_no_noops_1.0.0_lerobot'"
    )
    assert V21_CONVERTER in msg and "--push-to-hub=false" in msg


def test_an_unconverted_set_of_a_cross_dataset_sequence_keeps_its_own_message(monkeypatch) -> None:
    from cl_vla.data.cross_sequence import SourceSpec
    from cl_vla.data.multi_source import open_source
    from cl_vla.data.streams import UnconvertedDatasetError

    def cached_v21(repo_id, *_args):
        raise UnconvertedDatasetError(f"Dataset {repo_id!r} is a LeRobot v2.1 dataset, ...")

    monkeypatch.setattr("cl_vla.data.multi_source.open_dataset", cached_v21)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^Dataset 'spatial' of the task sequence: .* v2\.1 dataset"):
        open_source(SourceSpec("spatial", "IPEC-COMMUNITY/libero_spatial_no_noops_1.0.0_lerobot"), None)
