"""Read an offline W&B run (``run-<id>.wandb``) back without network or a W&B server.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, a 2-byte magic, a version byte) then
32 KiB blocks of records, each with a 7-byte header (crc32, length, type) where types FULL/FIRST/
MIDDLE/LAST join fragments; each payload is a ``wandb_internal_pb2.Record``. Used by the tests and by
anyone who wants to check what an offline run holds before ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(path: Path):
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (bad magic).")
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            buf = chunk
        elif kind == _MIDDLE:
            buf += chunk
        elif kind == _LAST:
            yield buf + chunk
            buf = b""
        elif kind == 0 and length == 0:
            pos += left - _HEADER  # zero padding up to the block's end
        else:
            break


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"config": {...}, "summary": {...}, "history": [{...}, ...], "files": [...]}`` of an offline run.

    ``run_dir`` is the ``offline-run-*`` directory or the ``.wandb`` file itself.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    p = Path(run_dir)
    path = p if p.is_file() else next(p.glob("run-*.wandb"))
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "files": []}
    for payload in _payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                out["summary"][_key(i)] = json.loads(i.value_json)
        elif kind in ("config", "run"):
            node = rec.config if kind == "config" else rec.run.config
            for i in node.update:
                out["config"][_key(i)] = json.loads(i.value_json)
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
    return out
