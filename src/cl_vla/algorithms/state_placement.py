"""Where and in what precision an algorithm keeps its per-parameter state (``algorithm.state_dtype``,
``algorithm.state_device``).

EWC's Fisher and anchors and SI's importance, anchor and task start are as large as the trainable
weights, once per task for separate EWC. ``state_dtype=bfloat16`` halves them; ``state_device=cpu``
keeps them in pinned host memory, copied to the device (asynchronously) where a step uses them. The
arithmetic always runs in the parameters' dtype on their device: only storage changes. The YAML
defaults (``float32``, ``params``) keep a float32 policy's state exactly as before; without them (the
constructors' ``None``) the state takes each parameter's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cl_vla.algorithms.sharded import is_dtensor, like

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_DEVICES = ("params", "cpu")
#: Algorithms whose state these options apply to.
PLACEABLE = ("ewc", "ewc_online", "si")


@dataclass(frozen=True)
class StatePlacement:
    """How per-parameter state is stored: ``dtype`` and ``device`` (``"params"``: with its parameter,
    sharded like it under FSDP; ``"cpu"``: pinned host memory)."""

    dtype: torch.dtype | None = None  # None: the parameter's own dtype (the constructors' default)
    device: str = "params"

    @classmethod
    def parse(cls, dtype: Any, device: Any) -> StatePlacement:
        if dtype is None:
            return cls(None, cls._device(device))
        if dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
        return cls(STATE_DTYPES[dtype], cls._device(device))

    @staticmethod
    def _device(device: Any) -> str:
        if device not in STATE_DEVICES:
            raise ValueError(f"state_device must be 'params' or 'cpu', got {device!r}.")
        return str(device)

    @property
    def names(self) -> tuple[str, str]:
        """``(state_dtype, state_device)`` as configured."""
        name = next((k for k, v in STATE_DTYPES.items() if v == self.dtype), "params")
        return name, self.device

    def store(self, t: Tensor, p: Tensor) -> Tensor:
        """``t`` (state of parameter ``p``) as it is kept; ``t`` itself when it already is."""
        dtype = p.dtype if self.dtype is None else self.dtype
        if self.device == "cpu":
            if t.device.type == "cpu" and t.dtype == dtype and (t.is_pinned() or not _pinnable()):
                return t
            out = t.detach().to("cpu", dtype=dtype)
            return out.pin_memory() if _pinnable() else out
        return like(t, p, dtype=dtype)

    @staticmethod
    def use(t: Tensor, p: Tensor) -> Tensor:
        """``t`` ready for arithmetic with ``p``: on its device, in its dtype (a transient copy when the
        state is kept otherwise; ``non_blocking`` from pinned memory)."""
        if t.device == p.device and t.dtype == p.dtype and is_dtensor(t) == is_dtensor(p):
            return t
        if is_dtensor(p) and not is_dtensor(t):
            return like(t, p)
        return t.to(device=p.device, dtype=p.dtype, non_blocking=True)


def _pinnable() -> bool:
    return torch.cuda.is_available()


__all__ = ["PLACEABLE", "STATE_DEVICES", "STATE_DTYPES", "StatePlacement"]
