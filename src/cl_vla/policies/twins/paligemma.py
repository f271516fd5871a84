"""pi0 / pi0.5 twins: lerobot's PI0 / PI05 policies with the sizes lerobot hard-codes replaced.

Building pi0 or pi0.5 fetches no weights, but lerobot fixes their sizes in code (lerobot 0.6.1):

- ``configuration_pi0.py:115`` / ``configuration_pi05.py``: only the ``gemma_300m`` and ``gemma_2b``
  variants are accepted, and ``get_gemma_config`` (``modeling_pi0.py:161``, ``modeling_pi05.py:158``)
  maps them to 18-layer, 1024/2048-wide Gemmas;
- ``PaliGemmaWithExpertModel.__init__`` (``modeling_pi0.py:207-233``, ``modeling_pi05.py:204-230``)
  sets a 257,152-token vocabulary, a 4304-wide SigLIP MLP, ``projection_dim=2048`` and a default
  (27-layer, 1152-wide) SigLIP;
- the processors hard-code the ``google/paligemma-3b-pt-224`` tokenizer (``processor_pi0.py:141``,
  ``processor_pi05.py:141``).

:func:`tiny_sizes` replaces exactly those names in the two modules' namespaces while a twin is built
(policy, processors, or ``from_pretrained``), and restores them afterwards. Kept as lerobot has it:
8 attention heads (``att_output.reshape(..., 1 * 8 * head_dim)``, ``modeling_pi0.py:124``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from cl_vla.policies.twins.folders import twin_folder

DEFAULTS: dict[str, Any] = {
    "width": 32,  # PaliGemma's Gemma
    "depth": 2,
    "mlp_dim": 64,
    "expert_width": 16,  # the action expert (gemma_300m's stand-in)
    "expert_mlp_dim": 32,
    "head_dim": 4,  # 8 heads (lerobot hard-codes 8), 1 key/value head, as both real variants
    "vision_hidden_size": 16,
    "vision_layers": 1,
    "vision_heads": 2,
    "vision_intermediate_size": 32,
    "patch_size": 16,
}
_HEADS = 8  # modeling_pi0.py:124 / modeling_pi05.py:121 reshape with 8 heads


def tokenizer_folder() -> Any:
    from cl_vla.policies.twins.tokenizer import write_tokenizer

    return twin_folder("paligemma_tokenizer", {}, lambda d: write_tokenizer(d))


def check_spec(spec: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        from cl_vla.errors import ConfigError

        raise ConfigError(
            f"model.twin has no option(s) {unknown} for {model_type}; allowed: {sorted(DEFAULTS)}."
        )
    return {**DEFAULTS, **spec}


def prepare(spec: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """Config fields of a twin: the variant names stay lerobot's (its validation accepts no other);
    :func:`tiny_sizes` gives them tiny sizes while the twin is built."""
    kwargs.setdefault("paligemma_variant", "gemma_2b")
    kwargs.setdefault("action_expert_variant", "gemma_300m")


@contextlib.contextmanager
def tiny_sizes(model_type: str, spec: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, lerobot's ``pi0`` / ``pi05`` modules build the tiny twin of ``spec``."""
    s = check_spec(spec, model_type)
    modeling = importlib.import_module(f"lerobot.policies.{model_type}.modeling_{model_type}")
    processor = importlib.import_module(f"lerobot.policies.{model_type}.processor_{model_type}")
    tok_dir = str(tokenizer_folder())
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    GemmaConfig = modeling.GemmaConfig

    def gemma_config(variant: str) -> Any:  # replaces get_gemma_config (modeling_pi0.py:161)
        expert = variant == "gemma_300m"
        return GemmaConfig(
            width=s["expert_width"] if expert else s["width"],
            depth=s["depth"],
            mlp_dim=s["expert_mlp_dim"] if expert else s["mlp_dim"],
            num_heads=_HEADS,
            num_kv_heads=1,
            head_dim=s["head_dim"],
        )

    paligemma_cls = modeling.PaliGemmaForConditionalGenerationWithPiGemma
    expert_cls = modeling.PiGemmaForCausalLM

    def paligemma(config: Any) -> Any:  # overrides modeling_pi0.py:207-222 before the model is built
        config._vocab_size = vocab
        config.image_token_index = vocab
        config.text_config.vocab_size = vocab
        v = config.vision_config
        v.hidden_size = s["vision_hidden_size"]
        v.num_hidden_layers = s["vision_layers"]
        v.num_attention_heads = s["vision_heads"]
        v.intermediate_size = s["vision_intermediate_size"]
        v.patch_size = s["patch_size"]
        v.projection_dim = s["width"]  # the projector maps SigLIP into the Gemma width
        config.text_config.num_image_tokens = (v.image_size // v.patch_size) ** 2
        return paligemma_cls(config=config)

    def expert(config: Any) -> Any:  # overrides vocab_size=257152 (modeling_pi0.py:233)
        config.vocab_size = vocab
        return expert_cls(config=config)

    tokenizer_step = processor.TokenizerProcessorStep

    def tokenizer(*args: Any, **kwargs: Any) -> Any:  # replaces processor_pi0.py:141's hub tokenizer
        kwargs["tokenizer_name"] = tok_dir
        return tokenizer_step(*args, **kwargs)

    replaced = {
        (modeling, "get_gemma_config"): gemma_config,
        (modeling, "PaliGemmaForConditionalGenerationWithPiGemma"): paligemma,
        (modeling, "PiGemmaForCausalLM"): expert,
        (processor, "TokenizerProcessorStep"): tokenizer,
    }
    saved = {key: getattr(*key) for key in replaced}
    try:
        for (module, name), value in replaced.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
