"""GR00T N1.7 twin: lerobot's GrootPolicy and processors on a tiny Qwen3-VL backbone and action head.

lerobot 0.6.1 builds GR00T from a base checkpoint: ``GrootPolicy`` loads ``base_model_path`` through
``GR00TN17.from_pretrained`` (``modeling_groot.py:107`` -> ``snapshot_download``, ``groot_n1_7.py:903``,
which accepts a local folder), whose backbone is built from ``AutoConfig.from_pretrained(model_name)``
(``groot_n1_7.py:356``). So the twin is two generated folders and no change to lerobot's model code:

- a tiny Qwen3-VL folder (config, a tokenizer built in code with Qwen's special tokens and a chat
  template, Qwen2-VL image / Qwen3-VL video processors);
- a tiny GR00T N1.7 base checkpoint (``GR00TN17Config`` with small action-head sizes and
  ``model_name`` = that folder, random weights saved once with a fixed seed).

Two names are replaced while a twin's processors are built (:func:`tiny_sizes`): the hard-coded
backbone processor ``nvidia/Cosmos-Reason2-2B`` (``processor_groot.py:1259``) and the 256 px / 230 px
image geometry defaults (``processor_groot.py:1247-1248``), which would make the tiny vision tower
patchify full-size frames. The saved processor keeps the folder's path, so ``from_pretrained`` needs
no patch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cl_vla.policies.twins.folders import twin_folder

DEFAULTS: dict[str, Any] = {
    "hidden_size": 32,  # Qwen3-VL text width = backbone_embedding_dim
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 8,
    "vision_hidden_size": 16,
    "vision_depth": 2,
    "vision_heads": 2,
    "image_size": 32,  # the processors' target and crop size
    "action_hidden_size": 32,  # GR00T action head (DiT) width
    "dit_layers": 2,
    "dit_heads": 2,
    "dit_head_dim": 16,
    "max_state_dim": 16,
    "max_action_dim": 16,
    "action_horizon": 10,
}

_SPECIALS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
)


def check_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec) - set(DEFAULTS))
    if unknown:
        from cl_vla.errors import ConfigError

        raise ConfigError(f"model.twin has no option(s) {unknown} for groot; allowed: {sorted(DEFAULTS)}.")
    return {**DEFAULTS, **spec}


def _write_qwen3vl(folder: Path, s: Mapping[str, Any]) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from cl_vla.policies.twins.tokenizer import byte_tokenizer

    tok = byte_tokenizer(["<|im_start|>", "<|im_end|>", *_SPECIALS.values()], _SPECIALS)
    tok.chat_template = _CHAT_TEMPLATE
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in _SPECIALS.items()}
    half = int(s["head_dim"]) // 2
    config = Qwen3VLConfig(
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=True,
        text_config={
            "model_type": "qwen3_vl_text",
            "hidden_size": s["hidden_size"],
            "intermediate_size": 2 * int(s["hidden_size"]),
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"],
            "head_dim": s["head_dim"],
            "vocab_size": len(tok),
            "max_position_embeddings": 4096,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": [half - 2 * (half // 4), half // 4, half // 4],
                "rope_type": "default",
            },
            "tie_word_embeddings": True,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "model_type": "qwen3_vl",
            "depth": s["vision_depth"],
            "hidden_size": s["vision_hidden_size"],
            "intermediate_size": 2 * int(s["vision_hidden_size"]),
            "num_heads": s["vision_heads"],
            "out_hidden_size": s["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": list(range(min(int(s["vision_depth"]), 2))),
        },
    )
    config.save_pretrained(str(folder))
    pixels = int(s["image_size"]) ** 2
    image = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    video = Qwen3VLVideoProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    Qwen3VLProcessor(
        image_processor=image, tokenizer=tok, video_processor=video, chat_template=_CHAT_TEMPLATE
    ).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def qwen3vl_folder(s: Mapping[str, Any]) -> Path:
    keys = ("hidden_size", "layers", "heads", "kv_heads", "head_dim", "vision_hidden_size", "vision_depth")
    spec = {k: s[k] for k in (*keys, "vision_heads", "image_size")}
    return twin_folder("qwen3vl", spec, lambda d: _write_qwen3vl(d, spec))


def _n17_config(s: Mapping[str, Any], backbone: Path) -> Any:
    from lerobot.policies.groot.groot_n1_7 import GR00TN17Config

    h = int(s["action_hidden_size"])
    return GR00TN17Config(
        model_name=str(backbone),
        backbone_embedding_dim=s["hidden_size"],
        select_layer=s["layers"],
        model_dtype="float32",
        dtype="float32",
        max_state_dim=s["max_state_dim"],
        max_action_dim=s["max_action_dim"],
        action_horizon=s["action_horizon"],
        hidden_size=h,
        input_embedding_dim=h,
        max_seq_len=256,
        max_num_embodiments=32,
        image_crop_size=[s["image_size"], s["image_size"]],
        image_target_size=[s["image_size"], s["image_size"]],
        diffusion_model_cfg={
            "positional_embeddings": None,
            "num_layers": s["dit_layers"],
            "num_attention_heads": s["dit_heads"],
            "attention_head_dim": s["dit_head_dim"],
            "norm_type": "ada_norm",
            "dropout": 0.0,
            "final_dropout": True,
            "output_dim": h,
            "interleave_self_attention": True,
        },
        vl_self_attention_cfg={
            "positional_embeddings": None,
            "num_layers": 1,
            "num_attention_heads": s["dit_heads"],
            "attention_head_dim": s["dit_head_dim"],
            "dropout": 0.0,
            "final_dropout": True,
        },
    )


def base_model_folder(s: Mapping[str, Any]) -> Path:
    """The tiny GR00T N1.7 base checkpoint (random weights drawn once with a fixed seed)."""
    backbone = qwen3vl_folder(s)

    def write(folder: Path) -> None:
        import torch
        from lerobot.policies.groot.groot_n1_7 import GR00TN17

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GR00TN17(_n17_config(s, backbone), load_backbone_weights=False)
        model.save_pretrained(str(folder))

    return twin_folder("groot_n17", {**s, "backbone": backbone.name}, write)


def prepare(spec: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    kwargs["base_model_path"] = str(base_model_folder(spec))
    kwargs.setdefault("max_state_dim", spec["max_state_dim"])
    kwargs.setdefault("max_action_dim", spec["max_action_dim"])
    kwargs.setdefault("chunk_size", spec["action_horizon"])
    kwargs.setdefault("n_action_steps", spec["action_horizon"])
    kwargs.setdefault("use_bf16", False)


@contextlib.contextmanager
def tiny_sizes(spec: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, lerobot's GR00T processors use the twin's backbone folder and image size."""
    import lerobot.policies.groot.processor_groot as processor

    s = check_spec(spec)
    size = (int(s["image_size"]), int(s["image_size"]))
    replaced = {
        "GROOT_N1_7_BACKBONE_MODEL": str(qwen3vl_folder(s)),  # processor_groot.py:1259
        "N1_7_DEFAULT_IMAGE_TARGET_SIZE": size,  # processor_groot.py:1247
        "N1_7_DEFAULT_IMAGE_CROP_SIZE": size,  # processor_groot.py:1248
    }
    saved = {name: getattr(processor, name) for name in replaced}
    try:
        for name, value in replaced.items():
            setattr(processor, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(processor, name, value)
