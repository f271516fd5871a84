"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the policy, through Lightning's
``ModelParallelStrategy``.

``trainer.strategy=fsdp`` (``conf/trainer/fsdp.yaml``: every visible GPU; ``fsdp_cpu.yaml``: 2 CPU
processes over gloo, what the tests use) shards the policy's parameters, gradients and optimizer state
over the data-parallel ranks: each transformer block of the VLA is one FSDP unit (its parameters are
gathered for its forward/backward and freed after), the rest of the policy is the root unit.

Lightning's ``FSDPStrategy`` (FSDP1) refuses CPU, so tests could not cover it; ``ModelParallelStrategy``
runs FSDP2 on a CPU device mesh with gloo. It is used as it is, with its sizes given (its ``'auto'`` means
tensor-parallel = processes, not data-parallel) and ``save_distributed_checkpoint=False``: weights and
optimizer are gathered into our one hashed checkpoint file, so every checkpoint of a run reads the same
way whatever the strategy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_vla.algorithms.sharded import is_sharded

#: Class names of the blocks that become one FSDP unit each: tiny_vla's encoders, and the transformer
#: layers of the hub VLAs as lerobot 0.6.1 builds them (SmolVLA: Llama text and expert layers, SmolVLM's
#: vision layers; pi0 / pi0.5: lerobot's PiGemma layers and SigLIP's; GR00T N1.7: Qwen3-VL's text and
#: vision blocks and the DiT's ``BasicTransformerBlock``). Any module whose class name ends in one of
#: ``_UNIT_SUFFIXES`` too (tests/test_vla_twins.py checks which blocks each twin gets).
UNIT_CLASSES = frozenset(
    {
        "FiLMConvEncoder",
        "TransformerEncoderLayer",
        "LlamaDecoderLayer",
        "Idefics3EncoderLayer",
        "SmolVLMEncoderLayer",
        "GemmaDecoderLayer",
        "_PiGemmaDecoderLayerBase",
        "SiglipEncoderLayer",
        "Qwen3DecoderLayer",
        "Qwen3VLTextDecoderLayer",
        "Qwen3VLVisionBlock",
        "BasicTransformerBlock",
    }
)
_UNIT_SUFFIXES = ("DecoderLayer", "EncoderLayer", "TransformerBlock")


def is_unit(module: nn.Module) -> bool:
    """Whether ``module`` is sharded as its own FSDP unit."""
    name = type(module).__name__.removeprefix("FSDP")
    return name in UNIT_CLASSES or name.endswith(_UNIT_SUFFIXES)


#: Layers that lerobot's mixture-of-transformers code runs piece by piece, VLM and action expert
#: attending jointly (SmolVLA's ``smolvlm_with_expert.forward_attn_layer``, pi0/pi0.5's
#: ``compute_layer_complete``): it calls the layer's norms and projections, never the layer, so FSDP's
#: hooks on the layer would not fire. Their ``mlp`` (called as a module; ~2/3 of the layer) is the unit
#: and the attention projections and norms join the root unit.
PIECEWISE_LAYERS = frozenset({"LlamaDecoderLayer", "_PiGemmaDecoderLayerBase"})


def shard_units(policy: nn.Module) -> list[str]:
    """Names of the submodules that :func:`shard_policy` makes FSDP units (outermost only)."""
    out: list[str] = []
    for name, module in policy.named_modules():
        if not name or any(name.startswith(f"{o}.") for o in out):
            continue
        if type(module).__name__.removeprefix("FSDP") in PIECEWISE_LAYERS:
            if isinstance(getattr(module, "mlp", None), nn.Module):
                out.append(f"{name}.mlp")
            continue
        if is_unit(module):
            out.append(name)
    return out


def shard_policy(policy: nn.Module, mesh: Any, mixed_precision: str = "none") -> list[str]:
    """Apply ``fully_shard`` to every block of ``policy`` (innermost first), then to ``policy`` itself.

    ``mesh``: the 1-D data-parallel device mesh. ``mixed_precision="bf16"``: parameters gathered in
    bfloat16 for compute, gradients reduced in float32 (FSDP's ``MixedPrecisionPolicy``; GPU only, the
    caller checks). Returns the units' names. Idempotent: Lightning calls ``configure_model`` every fit.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(policy):
        return shard_units(policy)
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = shard_units(policy)
    modules = dict(policy.named_modules())
    for name in reversed(units):
        fully_shard(modules[name], **kwargs)
    fully_shard(policy, **kwargs)
    # Methods other than forward that run the policy (evaluation, export) must gather its root too.
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in ("select_action", "predict_action_chunk", "compute_outputs"):
        if callable(getattr(policy, method, None)):
            register_fsdp_forward_method(policy, method)
    return units


def full_state_dict(policy: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) weights of a sharded ``policy``, on the CPU of rank 0 only (a collective:
    every rank calls it; the others get ``{}``); ``None`` for a policy that is not sharded."""
    if not is_sharded(policy):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Each in its own storage: a gathered tensor can be a view into a larger buffer (pi0's lm_head),
    # which safetensors refuses to write. Tied weights (GR00T's embeddings and head) stay one tensor, so
    # the export drops the duplicate name as it does for an unsharded policy.
    first: dict[int, str] = {}
    alias = {n: first.setdefault(id(p), n) for n, p in policy.named_parameters(remove_duplicate=False)}
    made: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        source = alias.get(k, k)
        if source not in made:
            made[source] = v.clone()
        state[k] = made[source]
    return state


def build_strategy(devices: int, num_nodes: int) -> Any:
    """Lightning's ``ModelParallelStrategy`` as data-parallel FSDP2 over ``devices * num_nodes`` ranks."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDPStrategy(ModelParallelStrategy):
        """``ModelParallelStrategy`` that restores through the run's own checkpoint IO.

        The one gap that forces a subclass: ``ModelParallelStrategy.load_checkpoint`` reads the file
        itself and loads weights and optimizer before the LightningModule's ``on_load_checkpoint`` runs
        (its ``load_model_state_dict`` / ``load_optimizer_state_dict`` are no-ops). Our restore has to
        see the checkpoint first: its sha256 is checked by the checkpoint IO (which also hands over the
        payload the loop already read), and a task-boundary resume keeps the weights the loop restored
        and starts the new task with a fresh optimizer, as the uninterrupted run did."""

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            from pathlib import Path

            from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            path = Path(self.broadcast(checkpoint_path))
            ckpt = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
            module = self.lightning_module
            keep = bool(getattr(module, "keep_weights_on_restore", False))
            options = StateDictOptions(full_state_dict=True, strict=module.strict_loading)
            weights = ckpt.pop("state_dict")
            if not keep:
                set_model_state_dict(self.model, weights, options=options)
            states = ckpt.get("optimizer_states") or []
            fresh = keep and bool(getattr(module, "reset_optimizer_per_task", True))
            if keep and not fresh:
                from cl_vla.training.module import _set_saved_lr

                _set_saved_lr(ckpt, module.lr * module.lr_factor(0))
            for optimizer, state in zip(self.optimizers, [] if fresh else states, strict=False):
                state = _rekey_optimizer_state_if_needed(state, self.model)
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
            # Loaded above: what on_load_checkpoint would hand to Lightning's (no-op) loaders.
            ckpt["state_dict"], ckpt["optimizer_states"] = {}, []
            return ckpt

    return FSDPStrategy(
        data_parallel_size=devices * num_nodes,
        tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )


__all__ = [
    "UNIT_CLASSES",
    "build_strategy",
    "full_state_dict",
    "is_unit",
    "shard_policy",
]
