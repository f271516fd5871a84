"""LeRobot datasets seen as ordered task streams (the seed's names are exported here)."""

from cl_vla.data.task_sequences import (
    TaskFilteredDataset,
    TaskSequence,
    TaskStream,
    build_episode_task_map,
    get_task_sequence,
    list_task_sequences,
    resolve_task_indices,
)

__all__ = [
    "TaskFilteredDataset",
    "TaskSequence",
    "TaskStream",
    "build_episode_task_map",
    "get_task_sequence",
    "list_task_sequences",
    "resolve_task_indices",
]
