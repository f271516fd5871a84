"""The synthetic writer reuses a dataset that already holds a sequence's instructions."""

from __future__ import annotations

import json

from cl_vla.data.synthetic import SETTINGS_FILE, SyntheticSpec, write_synthetic_dataset


def test_a_sub_sequence_reuses_the_suite_dataset(tmp_path):
    full = SyntheticSpec(
        instructions=("a b", "c d", "e f"), episodes_per_task=1, frames_per_episode=3, image_size=8
    )
    root = write_synthetic_dataset(tmp_path / "ds", "t/ds", full)
    stamp = (root / SETTINGS_FILE).stat().st_mtime_ns
    sub = SyntheticSpec(instructions=("e f", "a b"), episodes_per_task=1, frames_per_episode=3, image_size=8)
    write_synthetic_dataset(root, "t/ds", sub)
    assert (root / SETTINGS_FILE).stat().st_mtime_ns == stamp  # not rewritten
    other = SyntheticSpec(instructions=("a b",), episodes_per_task=2, frames_per_episode=3, image_size=8)
    write_synthetic_dataset(root, "t/ds", other)
    saved = json.loads((root / SETTINGS_FILE).read_text())
    assert saved["instructions"] == ["a b"] and saved["episodes_per_task"] == 2  # settings changed: rewritten
