"""What the hub VLAs need from a dataset, checked before anything is built (one sentence each)."""

from __future__ import annotations

from typing import Any

from cl_vla.errors import DataError

#: lerobot policy types that read cameras, a state vector and the instruction, padded to max dims.
VLA_TYPES = ("smolvla", "pi0", "pi05", "groot")


def check_vla_features(cfg: Any, features: dict[str, Any], repo_id: str, saved: bool) -> None:
    """Refuse a dataset a VLA cannot train on: no camera, no state, a camera the loaded policy was
    trained with but the dataset lacks, or a state/action wider than ``max_state_dim`` /
    ``max_action_dim`` (lerobot pads shorter vectors; wider ones fail deep inside the model)."""
    if cfg.type not in VLA_TYPES:
        return
    from lerobot.configs.types import FeatureType

    cameras = sorted(k for k, f in features.items() if f.type is FeatureType.VISUAL)
    if not cameras:
        raise DataError(
            f"Dataset {repo_id!r} has no camera ('observation.images.*'); "
            f"model={cfg.type} needs at least one."
        )
    if saved:
        wanted = sorted(k for k, f in (cfg.input_features or {}).items() if f.type is FeatureType.VISUAL)
        missing = [k for k in wanted if k not in cameras and "empty_camera" not in k]
        if missing:
            from cl_vla.envs.libero_schema import schemas_with_cameras

            # LIBERO's hub sets name the wrist camera image2 or wrist_image: say which family is which.
            model_s, data_s = schemas_with_cameras(wanted), schemas_with_cameras(cameras)
            hint = (
                f" (the model's are LIBERO schema {model_s[0]!r}'s, the dataset's {data_s[0]!r}'s: rename "
                "them in a sequence across datasets, task_sequence.datasets.<name>.rename)"
                if model_s and data_s
                else ""
            )
            raise DataError(
                f"Dataset {repo_id!r} lacks camera {missing[0]!r} that the model in model.pretrained_path "
                f"was trained with; its cameras are {cameras}{hint}."
            )
    state = features.get("observation.state")
    if state is None:
        raise DataError(
            f"Dataset {repo_id!r} has no 'observation.state'; model={cfg.type} needs the robot state."
        )
    action = features.get("action")
    for what, feat, limit in (
        ("observation.state", state, "max_state_dim"),
        ("action", action, "max_action_dim"),
    ):
        width = int(feat.shape[-1]) if feat is not None and feat.shape else 0
        allowed = getattr(cfg, limit, None)
        if allowed is not None and width > int(allowed):
            raise DataError(
                f"Dataset {repo_id!r} has a {width}-d {what!r}, wider than model={cfg.type}'s "
                f"{limit}={allowed}; set model.{limit}>={width}."
            )


#: The hub tokenizer each real VLA's processor loads when it is built (lerobot 0.6.1).
_HUB_TOKENIZERS = {
    "pi0": "google/paligemma-3b-pt-224",  # processor_pi0.py:141
    "pi05": "google/paligemma-3b-pt-224",  # processor_pi05.py:141
    "groot": "nvidia/Cosmos-Reason2-2B",  # processor_groot.py:1259
}


def check_tokenizer_offline(cfg: Any, is_twin: bool) -> None:
    """Offline (``HF_HUB_OFFLINE=1``), refuse before building anything when the VLA's tokenizer is
    neither a local folder nor in the hub cache; otherwise the failure comes after a multi-GB build."""
    import os

    if cfg.type not in VLA_TYPES or is_twin or os.environ.get("HF_HUB_OFFLINE") != "1":
        return
    from pathlib import Path

    name = getattr(cfg, "vlm_model_name", None) or _HUB_TOKENIZERS.get(cfg.type)
    if not name or Path(name).expanduser().is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
        return
    from cl_vla.policies.factory import TokenizerNotFoundError

    raise TokenizerNotFoundError(
        f"model={cfg.type} needs the tokenizer {name!r}, which is neither a local folder nor in the hub "
        f"cache (HF_HUB_OFFLINE=1); download it on a machine with hub access, or use model={cfg.type}_tiny."
    )
