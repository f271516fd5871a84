"""Policy configs from the ``model`` group: any lerobot policy type, plus our tiny_vla."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cl_vla.errors import ConfigError, DataError, one_of
from cl_vla.paths import conf_dir

# Fields of the `model` group that are ours, not the lerobot config's.
_OWN_KEYS = {"type", "pretrained_path", "lora", "twin", "recipe"}


def model_choices() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def _check_pretrained(model_type: str, path: str) -> None:
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"model.pretrained_path={path!r} is a folder without config.json; give a folder written by "
                "lerobot's save_pretrained (config.json + model.safetensors, processor files beside them)."
            )
        return
    if local.exists():
        return
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline or path.startswith((".", "/", "~")):
        why = "reachable (HF_HUB_OFFLINE=1)" if offline else "a hub repo id"
        raise ConfigError(
            f"model={model_type} needs pretrained weights {path!r}, which are neither a local directory nor "
            f"{why}; download them on a machine with hub access and set model.pretrained_path=<local copy>."
        )


def build_policy_config(model_cfg: Mapping[str, Any], ds_meta: Any, device: str = "cpu") -> Any:
    """A lerobot ``PreTrainedConfig`` with input/output features taken from the dataset.

    Raises one-sentence errors for an unknown model type, unknown fields, absent pretrained weights,
    and dataset features that lack what the policy needs.
    """
    import lerobot.policies  # noqa: F401  (registers lerobot's own policy configs)
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.configs.types import FeatureType
    from lerobot.utils.feature_utils import dataset_to_policy_features

    import cl_vla.policies  # noqa: F401  (registers tiny_vla with lerobot's factory)

    model_cfg = dict(model_cfg)
    model_type = model_cfg.get("type")
    known = PreTrainedConfig.get_known_choices()
    if model_type not in known:
        raise ConfigError(f"model.type={model_type!r} is unknown; choose one of {one_of(model_choices())}.")
    pretrained = model_cfg.get("pretrained_path")
    if pretrained:
        _check_pretrained(model_type, str(pretrained))
    kwargs = {k: v for k, v in model_cfg.items() if k not in _OWN_KEYS}
    if isinstance(kwargs.get("normalization_mapping"), Mapping):
        from lerobot.configs.types import NormalizationMode

        # YAML gives names ("MEAN_STD"); lerobot's normalizer compares enum members.
        modes = {m.name: m for m in NormalizationMode}
        mapping = {}
        for k, v in kwargs["normalization_mapping"].items():
            mode = modes.get(str(v).upper())
            if mode is None:
                raise ConfigError(
                    f"model.normalization_mapping.{k}={v!r} is not allowed; choose {one_of(list(modes))}."
                )
            mapping[k] = mode
        kwargs["normalization_mapping"] = mapping
    twin = None
    if model_cfg.get("twin") is not None:
        from cl_vla.policies.twins import prepare_twin

        twin = prepare_twin(model_type, model_cfg["twin"], kwargs)
    local = Path(str(pretrained)).expanduser() if pretrained else None
    saved_cfg = None
    if local is not None and local.is_dir():
        from cl_vla.policies.pretrained import config_from_folder

        saved_cfg, saved_twin = config_from_folder(model_type, local, kwargs, device)
        twin = saved_twin or twin
    cls = PreTrainedConfig.get_choice_class(model_type)
    try:
        cfg = saved_cfg if saved_cfg is not None else cls(device=device, **kwargs)
    except TypeError as e:
        fields = sorted(getattr(cls, "__dataclass_fields__", {}))
        bad = [k for k in kwargs if k not in fields]
        raise ConfigError(
            f"model={model_type} has no field(s) {bad or list(kwargs)}; "
            f"see {cls.__name__} for the allowed ones."
        ) from e
    except ValueError as e:
        raise ConfigError(f"model={model_type}: {e}".splitlines()[0]) from e
    if pretrained:
        cfg.pretrained_path = str(local) if local is not None and local.is_dir() else str(pretrained)
    from cl_vla.policies.twins import attach
    from cl_vla.policies.vla_checks import check_tokenizer_offline

    attach(cfg, twin)
    check_tokenizer_offline(cfg, is_twin=twin is not None)

    try:
        features = dataset_to_policy_features(ds_meta.features)
    except ValueError as e:  # e.g. an image feature that is not (height, width, channels)
        raise DataError(
            f"Dataset {ds_meta.repo_id!r} has a feature lerobot cannot use: {e}".splitlines()[0]
        ) from e
    from cl_vla.policies.vla_checks import check_vla_features

    check_vla_features(cfg, features, ds_meta.repo_id, saved=saved_cfg is not None)
    cfg.output_features = {k: f for k, f in features.items() if f.type is FeatureType.ACTION}
    cfg.input_features = {k: f for k, f in features.items() if k not in cfg.output_features}
    if not cfg.output_features:
        raise DataError(f"Dataset {ds_meta.repo_id!r} has no 'action' feature; a policy needs one to learn.")
    if not cfg.image_features and not getattr(cfg, "robot_state_feature", None):
        raise DataError(
            f"Dataset {ds_meta.repo_id!r} has neither image ('observation.images.*') nor state "
            "('observation.state') features; model={model_type} needs at least one."
        )
    try:
        cfg.validate_features()
    except (ValueError, KeyError) as e:
        raise DataError(
            f"Dataset {ds_meta.repo_id!r} does not fit model={model_type}: {e}".splitlines()[0]
        ) from e
    return cfg
