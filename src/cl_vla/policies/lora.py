"""LoRA adapters injected into a lerobot policy in place, through ``peft``.

Adapters go *into* the policy's own modules (``peft.inject_adapter_in_model``) rather than wrapping the
policy in a ``PeftModel``: the object stays a lerobot ``PreTrainedPolicy`` whose ``forward``,
``select_action`` and processors work unchanged, and its ``state_dict`` simply gains the adapter
tensors (``<layer>.lora_A.<adapter>.weight``; the wrapped weight becomes ``<layer>.base_layer.weight``).

Two users: :class:`cl_vla.algorithms.lora.PerTaskLoRA` (one adapter per task) and plain LoRA
fine-tuning, a model option (a ``lora:`` block in the ``model`` config) applied by
:func:`apply_model_lora` right after the policy is built.

``peft`` is imported only when LoRA is used, so the other algorithms start without it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cl_vla.errors import ConfigError

#: Layer types LoRA is injected into (peft has LoRA variants for each).
ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

# Layers whose weights PyTorch reads directly instead of calling the layer, so a LoRA wrapper there is
# silently bypassed: nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward,
# and nn.TransformerEncoderLayer's inference fast path (eval + no_grad) reads linear1/linear2.weight.
# Checked on torch 2.11: with LoRA on linear1/linear2, evaluation outputs equal the base model's.
_FUSED_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer)

LORA_PREFIX = "lora_"


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ConfigError(
            "LoRA needs the 'peft' package, which is not installed; it comes with cl_vla: pip install -e ."
        ) from e
    return peft


def _peft_functional() -> Any:
    """``peft.functional``: peft's adapter switches for models that are not a ``PeftModel``."""
    _require_peft()
    from peft import functional

    return functional


@dataclass
class LoRASettings:
    """Rank, scaling, dropout and targets of a LoRA adapter, validated on construction.

    ``target_modules``: names of modules to adapt, relative to the policy (``model.trunk.0``). Each
    entry matches a module whose name equals it or ends with ``.<entry>`` (peft's list semantics), or
    that it fully matches as a regular expression (``model\\.trunk\\..*``). ``None``: the policy's own
    lerobot PEFT defaults when it defines them (SmolVLA, pi0, pi0.5), otherwise every adaptable layer
    (Linear, Conv1d, Conv2d). Layers PyTorch bypasses (inside MultiheadAttention and
    TransformerEncoderLayer) are never adapted.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    #: Resolved once against a model (exact module names); stored so a resume adapts the same layers.
    resolved_targets: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r={self.r!r} is not allowed; it must be a positive integer.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ConfigError(f"LoRA alpha={self.alpha!r} is not allowed; it must be a positive number.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float):
            raise ConfigError(f"LoRA dropout={self.dropout!r} is not allowed; it must be a number in [0, 1).")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout={self.dropout!r} is not allowed; it must be in [0, 1).")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
                raise ConfigError(
                    f"LoRA target_modules={self.target_modules!r} is not allowed; it must be null or a "
                    "non-empty list of module names / regular expressions."
                )
        self.r, self.alpha, self.dropout = int(self.r), float(self.alpha), float(self.dropout)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> LoRASettings:
        """From a config block; unknown keys are an error naming them."""
        allowed = {"r", "alpha", "dropout", "target_modules"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ConfigError(f"LoRA has no option(s) {unknown}; allowed: {sorted(allowed)}.")
        return cls(**dict(cfg))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible (checkpoints, logs)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------- targeting


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named layers LoRA can adapt effectively (see ``_FUSED_PARENTS`` for the excluded ones)."""
    fused: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _FUSED_PARENTS):
            fused.update(f"{name}.{child}" if name else child for child, _ in module.named_modules() if child)
    out = {}
    for name, module in model.named_modules():
        # Already-injected layers are found again through their wrapper's name, not base_layer.
        if name in fused or name.endswith(".base_layer") or f".{LORA_PREFIX}" in f".{name}":
            continue
        if isinstance(module, ADAPTABLE_TYPES) or _is_lora_layer(module):
            out[name] = module
    return out


def _policy_default_targets(model: nn.Module) -> str | None:
    """A lerobot policy's own PEFT target regex (``_get_default_peft_targets``), if it defines one."""
    getter = getattr(model, "_get_default_peft_targets", None)
    if getter is None:
        return None
    try:
        targets = (getter() or {}).get("target_modules")
    except Exception:  # a policy's default may need state it lacks (e.g. unloaded VLM weights)
        return None
    if isinstance(targets, str):
        return targets
    if targets:
        return "|".join(f"(?:.*\\.)?{re.escape(t)}" for t in targets)
    return None


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | None) -> list[str]:
    """Exact names of the layers ``target_modules`` selects in ``model`` (see :class:`LoRASettings`).

    Raises a one-sentence :class:`ConfigError` when nothing adaptable matches.
    """
    candidates = adaptable_modules(model)
    if target_modules is None:
        default = _policy_default_targets(model)
        patterns = [default] if default else None
    else:
        patterns = list(target_modules)
    names = [n for n in candidates if patterns is None or any(_matches(n, p) for p in patterns)]
    if not names:
        raise ConfigError(
            f"LoRA target_modules={list(target_modules) if target_modules else None!r} matches no Linear/"
            f"Conv layer of {type(model).__name__} (layers inside MultiheadAttention or "
            "TransformerEncoderLayer are excluded); name modules as they appear in model.named_modules()."
        )
    return names


# -------------------------------------------------------------------------------------------- adapters


def _is_lora_layer(module: nn.Module) -> bool:
    # Checked by attribute rather than isinstance so this module imports without peft.
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "set_adapter")


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft LoRA layers injected into ``model``."""
    return [m for m in model.modules() if _is_lora_layer(m)]


def adapter_names(model: nn.Module) -> list[str]:
    """Adapters present in ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def inject_lora(model: nn.Module, settings: LoRASettings, adapter_name: str = "default") -> list[str]:
    """Add adapter ``adapter_name`` to ``model`` in place; returns the adapted layers' names.

    Targets are resolved on first use and kept in ``settings.resolved_targets``, so every later adapter
    (and a resumed run) adapts exactly the same layers. LoRA's B matrix starts at zero: a new adapter
    leaves the model's outputs unchanged until it trains. Trainability is left to the caller
    (:func:`set_trainable`): peft's own choice depends on which adapters existed before.
    """
    peft = _require_peft()
    if adapter_name in adapter_names(model):
        raise ConfigError(f"LoRA adapter {adapter_name!r} already exists in {type(model).__name__}.")
    if settings.resolved_targets is None:
        settings.resolved_targets = resolve_target_modules(model, settings.target_modules)
    present = adaptable_modules(model)
    missing = [n for n in settings.resolved_targets if n not in present]
    if missing:
        raise ConfigError(f"LoRA target layer(s) {missing[:3]} do not exist in {type(model).__name__}.")
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # A regex of the exact names: peft's list form matches by suffix and could catch more layers.
        target_modules="^(?:" + "|".join(re.escape(n) for n in settings.resolved_targets) + ")$",
        bias="none",
    )
    with warnings.catch_warnings():
        # peft warns when the model already carries adapters: several adapters are the point here.
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        peft.inject_adapter_in_model(config, model, adapter_name=adapter_name)
    # peft leaves a dict of its configs on the model; it is not state and lerobot does not expect it.
    model.__dict__.pop("peft_config", None)
    return list(settings.resolved_targets)


def lora_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the LoRA weights of ``adapter`` (all adapters when None)."""
    for name, p in model.named_parameters():
        parts = name.split(".")
        is_lora = any(part.startswith(LORA_PREFIX) for part in parts)
        if is_lora and (adapter is None or adapter in parts):
            yield name, p


def activate_adapter(model: nn.Module, adapter: str | None) -> None:
    """Make ``adapter`` the one used in the forward pass; ``None`` disables adapters (the base model).

    Leaves ``requires_grad`` as it was: peft's switches set it as a side effect.
    """
    layers = lora_layers(model)
    if not layers:
        return
    flags = {id(p): p.requires_grad for p in model.parameters()}
    if adapter is not None and any(adapter not in layer.lora_A for layer in layers):
        raise ConfigError(f"LoRA adapter {adapter!r} does not exist; have {adapter_names(model)}.")
    # peft.functional has no switch that disables adapters (only PeftModel's context manager does), so
    # each layer's own enable_adapters is called; selecting one is peft.functional.set_adapter.
    for layer in layers:
        layer.enable_adapters(adapter is not None)
    if adapter is not None:
        _peft_functional().set_adapter(model, adapter)
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])


def active_adapter(model: nn.Module) -> str | None:
    """The adapter in use (``None``: adapters disabled or none injected)."""
    layers = lora_layers(model)
    if not layers or layers[0].disable_adapters:
        return None
    active = layers[0].active_adapters
    return active[0] if active else None


def set_trainable(model: nn.Module, adapter: str | None, train_base: bool = False) -> None:
    """Only ``adapter``'s LoRA weights train (plus every non-LoRA weight when ``train_base``)."""
    lora_ids = {id(p) for _, p in lora_parameters(model)}
    for p in model.parameters():
        if id(p) not in lora_ids:
            p.requires_grad_(train_base)
    names = adapter_names(model)
    if names:
        functional = _peft_functional()
        functional.set_requires_grad(model, names, requires_grad=False)
        if adapter is not None:
            functional.set_requires_grad(model, adapter, requires_grad=True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# adapter_state / load_adapter_state stay hand-written: peft.functional's get_peft_model_state_dict and
# set_peft_model_state_dict need the ``peft_config`` that inject_lora removes from the policy, key the
# weights without the adapter's name (checkpoints key them by full parameter name), return live tensors
# rather than CPU copies, and load with strict=False instead of refusing weights that do not match.


def adapter_state(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """CPU copies of ``adapter``'s weights, keyed by parameter name."""
    return {n: p.detach().cpu().clone() for n, p in lora_parameters(model, adapter)}


def load_adapter_state(model: nn.Module, adapter: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy saved weights into ``adapter``; the names must match exactly."""
    params = dict(lora_parameters(model, adapter))
    if set(params) != set(state):
        diff = sorted(set(params) ^ set(state))[:3]
        raise ConfigError(f"Saved weights of LoRA adapter {adapter!r} do not match the model (e.g. {diff}).")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ------------------------------------------------------------------------------------ plain LoRA option


def apply_model_lora(policy: nn.Module, lora_cfg: Mapping[str, Any] | None) -> LoRASettings | None:
    """Plain LoRA fine-tuning: the ``model.lora`` block, applied right after the policy is built.

    Injects one adapter (``"default"``) and freezes everything else, so every task's optimizer (built
    from the parameters that require grad) trains only the adapter. Call it before a checkpoint is
    loaded, so the adapter's keys exist. ``None`` or an empty block does nothing.
    """
    if not lora_cfg:
        return None
    settings = LoRASettings.from_mapping(lora_cfg)
    # Draws the adapter's initialization from the run's seeded stream: a resumed run rebuilds the
    # policy the same way before its RNG state and weights are restored.
    inject_lora(policy, settings, "default")
    activate_adapter(policy, "default")
    set_trainable(policy, "default")
    return settings


__all__ = [
    "LoRASettings",
    "activate_adapter",
    "active_adapter",
    "adaptable_modules",
    "adapter_names",
    "adapter_state",
    "apply_model_lora",
    "count_parameters",
    "inject_lora",
    "load_adapter_state",
    "lora_layers",
    "lora_parameters",
    "resolve_target_modules",
    "set_trainable",
]
