"""The hub VLAs' real architectures, reproduced in code for the memory plan (no hub, no weights).

- SmolVLA's backbone ``HuggingFaceTB/SmolVLM2-500M-Video-Instruct``: lerobot reads its config from the
  hub (``smolvlm_with_expert.py:99``); its architecture is copied here (SmolLM2-360M text model:
  960 wide, 32 layers, 15 heads / 5 key-value heads, MLP 2560, vocabulary 49,280; SigLIP vision
  model: 768 wide, 12 layers, patch 16 at 512 px; pixel-shuffle factor 4). The folder's processor is
  the twin's (the plan never tokenizes), so nothing is downloaded.
- pi0 / pi0.5: lerobot builds them from code alone (``get_gemma_config``), nothing to reproduce.
- GR00T N1.7: lerobot carries Cosmos-Reason2-2B's config in code
  (``groot_n1_7.py:751 _cosmos_reason2_qwen3_vl_config``) and the action head's sizes in
  ``GR00T_N1_7_DEFAULTS``; the model is built from those without ``snapshot_download``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cl_vla.policies.twins.folders import twin_folder

SMOLVLM2_500M: dict[str, Any] = {
    "text_config": {
        "model_type": "llama",
        "vocab_size": 49280,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "scale_factor": 4,
    "image_token_id": 49190,
}


def smolvlm2_500m_folder() -> Path:
    """A folder with SmolVLM2-500M's config and the twin's processor (meta-device builds only)."""

    def write(folder: Path) -> None:
        from transformers import SmolVLMConfig

        from cl_vla.policies.twins.smolvla import smolvlm_folder

        SmolVLMConfig(**SMOLVLM2_500M).save_pretrained(str(folder))
        twin = smolvlm_folder()
        for f in twin.iterdir():
            if f.name != "config.json" and f.is_file():
                (folder / f.name).write_bytes(f.read_bytes())

    return twin_folder("smolvlm2_500m_arch", SMOLVLM2_500M, write)


def groot_meta_policy(cfg: Any) -> Any:
    """GR00T N1.7 at full size with lerobot's default tuning flags (call under ``torch.device("meta")``)."""
    from lerobot.policies.groot.groot_n1_7 import GR00TN17, GR00TN17Config

    model = GR00TN17(
        GR00TN17Config(tune_llm=cfg.tune_llm, tune_visual=cfg.tune_visual), load_backbone_weights=False
    )
    model.action_head.set_trainable_parameters(
        tune_projector=cfg.tune_projector,
        tune_diffusion_model=cfg.tune_diffusion_model,
        tune_vlln=cfg.tune_vlln,
    )
    return model
