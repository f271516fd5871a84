"""Per-task export in lerobot's format: after each task, ``<run>/export/task_XX/`` holds the policy and
its processors (``save_pretrained``), loadable with lerobot's ``from_pretrained`` (``lerobot-eval``,
the hub) or :func:`cl_vla.policies.factory.load_policy`.

LoRA adapters (``model.lora``, ``algorithm=lora_per_task``) are merged into the weights they adapt
(the adapter active after the task): lerobot's config knows nothing of cl_vla's adapters, so the
export is the plain policy those weights make.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cl_vla.policies.lora import active_adapter, lora_layers

EXPORT_DIR = "export"


def export_dir(run_dir: Path, task: int) -> Path:
    return Path(run_dir) / EXPORT_DIR / f"task_{task:02d}"


def merged_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The policy's state dict with LoRA merged into its base weights; ``None`` without LoRA."""
    layers = {id(m): m for m in lora_layers(policy)}
    if not layers:
        return None
    adapter = active_adapter(policy)
    state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, module in policy.named_modules():
        if id(module) not in layers:
            continue
        base = state.pop(f"{name}.base_layer.weight")
        if adapter is not None and adapter in module.lora_A:
            with torch.no_grad():
                base = base + module.get_delta_weight(adapter).to(base.dtype)
        out[f"{name}.weight"] = base
        bias = state.pop(f"{name}.base_layer.bias", None)
        if bias is not None:
            out[f"{name}.bias"] = bias
    for k, v in state.items():
        if ".lora_" not in k:
            out[k] = v
    return out


def export_task(
    run_dir: Path,
    task: int,
    policy: Any,
    preprocessor: Any,
    postprocessor: Any,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``<run>/export/task_XX`` (atomically: a half-written folder is never left under that name).

    ``state_dict``: the full weights when the policy is sharded (gathered by every rank with
    :func:`cl_vla.training.fsdp.full_state_dict`, handed in on rank 0); else the policy's own."""
    import shutil
    import tempfile

    from cl_vla.policies.twins import twin_of, write_twin_file

    final = export_dir(run_dir, task)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        state = state_dict if state_dict is not None else merged_state_dict(policy)
        policy.save_pretrained(str(tmp), state_dict=state)
        preprocessor.save_pretrained(str(tmp))
        if postprocessor is not None:
            postprocessor.save_pretrained(str(tmp))
        write_twin_file(tmp, twin_of(policy.config))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
