"""SmolVLA twin: lerobot's SmolVLA, unchanged, on a tiny SmolVLM written into a local folder.

lerobot reads the VLM's config and processor (``smolvlm_with_expert.py:99,101``,
``AutoConfig`` / ``AutoProcessor.from_pretrained(vlm_model_name)``) and the tokenizer
(``processor_smolvla.py:70``) from ``vlm_model_name``, and all three accept a local folder. So no
lerobot code is replaced: the twin is a folder holding a 2-layer SmolVLM config and a SmolVLM
processor whose tokenizer is built in code, and ``vlm_model_name`` points at it
(``load_vlm_weights=False``: random weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cl_vla.policies.twins.folders import twin_folder

# The special tokens SmolVLM's processor and lerobot's SmolVLA look up by name.
_NAMED = {
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
}

DEFAULTS: dict[str, Any] = {
    "hidden_size": 32,  # text model width (the expert is expert_width_multiplier times it)
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vision_hidden_size": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "vision_intermediate_size": 64,
    "image_size": 32,  # must equal the policy's resize_imgs_with_padding
    "patch_size": 16,
    "scale_factor": 2,  # pixel shuffle: (image_size / patch_size / scale_factor)^2 tokens per image
}


def _write(folder: Path, s: Mapping[str, Any]) -> None:
    from transformers import SmolVLMConfig, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    from cl_vla.policies.twins.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer([*_NAMED.values(), "<row_1_col_1>"], _NAMED)
    vocab = len(tokenizer)
    heads = int(s["num_attention_heads"])
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": s["hidden_size"],
            "intermediate_size": s["intermediate_size"],
            "num_hidden_layers": s["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": s["num_key_value_heads"],
            "head_dim": int(s["hidden_size"]) // heads,
            "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": s["vision_hidden_size"],
            "intermediate_size": s["vision_intermediate_size"],
            "num_hidden_layers": s["vision_layers"],
            "num_attention_heads": s["vision_heads"],
            "image_size": s["image_size"],
            "patch_size": s["patch_size"],
        },
        scale_factor=s["scale_factor"],
        image_token_id=tokenizer.convert_tokens_to_ids(_NAMED["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(str(folder))
    size = {"longest_edge": int(s["image_size"])}
    tokens_per_image = (int(s["image_size"]) // int(s["patch_size"]) // int(s["scale_factor"])) ** 2
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(size=size),
        image_seq_len=tokens_per_image,
    )
    processor.save_pretrained(str(folder))


def smolvlm_folder(spec: Mapping[str, Any] | None = None) -> Path:
    """The tiny SmolVLM folder for ``spec`` (keys of :data:`DEFAULTS`), generated on first use."""
    unknown = sorted(set(spec or {}) - set(DEFAULTS))
    if unknown:
        from cl_vla.errors import ConfigError

        raise ConfigError(f"model.twin has no option(s) {unknown} for smolvla; allowed: {sorted(DEFAULTS)}.")
    s = {**DEFAULTS, **(spec or {})}
    return twin_folder("smolvlm", s, lambda d: _write(d, s))


def prepare(spec: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """Point the SmolVLA config's ``vlm_model_name`` at the twin folder; random VLM weights."""
    s = {**DEFAULTS, **spec}
    kwargs["vlm_model_name"] = str(smolvlm_folder(spec))
    kwargs.setdefault("load_vlm_weights", False)
    kwargs.setdefault("resize_imgs_with_padding", (s["image_size"], s["image_size"]))
