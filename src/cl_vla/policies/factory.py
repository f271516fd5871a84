"""Build, save and load policies and their processors, twins included (the loop's only entry points).

lerobot's ``make_policy`` / ``make_pre_post_processors`` / ``from_pretrained`` do the work; this module
runs them inside a twin's build context (:func:`cl_vla.policies.twins.building`) and turns the
offline failures users meet on the way into one sentence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cl_vla.errors import ConfigError
from cl_vla.policies.twins import building, read_twin_file, twin_of, write_twin_file


class TokenizerNotFoundError(ConfigError):
    """A tokenizer a policy needs is neither a local folder nor in the hub cache (offline)."""


def _tokenizer_error(e: Exception, policy_cfg: Any) -> TokenizerNotFoundError | None:
    """One sentence when ``e`` is a tokenizer/processor that could not be found offline."""
    text = str(e)
    if not isinstance(e, OSError | ValueError) or not any(
        k in text
        for k in ("offline", "couldn't connect", "Can't load", "not a local folder", "does not appear")
    ):
        return None
    name = getattr(policy_cfg, "vlm_model_name", None) or "google/paligemma-3b-pt-224"
    offline = " (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return TokenizerNotFoundError(
        f"model={policy_cfg.type} needs the tokenizer/processor {name!r}, which is neither a local folder "
        f"nor in the hub cache{offline}; download it on a machine with hub access, "
        f"or use model={policy_cfg.type}_tiny."
    )


def _damaged_weights_error(e: BaseException, policy_cfg: Any) -> ConfigError | None:
    """A weights file of ``model.pretrained_path`` that safetensors cannot read (truncated, damaged):
    one sentence naming the file instead of safetensors' traceback."""
    from safetensors import SafetensorError

    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, SafetensorError):
        cause = cause.__cause__ or cause.__context__
    folder = getattr(policy_cfg, "pretrained_path", None)
    if cause is None or not folder:
        return None
    weights = sorted(Path(folder).glob("*.safetensors"))
    name = str(weights[0]) if len(weights) == 1 else f"a .safetensors file of {folder}"
    why = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return ConfigError(
        f"model.pretrained_path: {name!r} cannot be read ({why}); it is truncated or damaged: copy, "
        "download or export it again."
    )


def make_policy(policy_cfg: Any, ds_meta: Any) -> Any:
    """lerobot's ``make_policy``, in the twin's build context."""
    from lerobot.policies.factory import make_policy as lerobot_make_policy

    from cl_vla.policies.flow_outputs import add_compute_outputs

    try:
        with building(twin_of(policy_cfg)):
            policy = lerobot_make_policy(policy_cfg, ds_meta=ds_meta)
    except Exception as e:
        err = _damaged_weights_error(e, policy_cfg)
        if err is None and isinstance(e, OSError | ValueError):
            err = _tokenizer_error(e, policy_cfg)
        if err is None:
            raise
        raise err from e
    add_compute_outputs(policy)  # LwF / DER++ distill it
    # Training mode, as lerobot builds most policies: GR00T comes out of transformers' from_pretrained in
    # eval mode, and Lightning keeps submodule modes at fit start, so a run resumed mid-task (no
    # evaluation before its first step) trained with GR00T's state dropout off while the uninterrupted
    # run had it on. The policies' own train() keeps their frozen parts in eval mode.
    policy.train()
    return policy


def make_processors(policy_cfg: Any, dataset_stats: dict | None) -> tuple[Any, Any]:
    """lerobot's ``make_pre_post_processors`` from the config, in the twin's build context."""
    from lerobot.policies.factory import make_pre_post_processors

    try:
        with building(twin_of(policy_cfg)):
            return make_pre_post_processors(policy_cfg, dataset_stats=dataset_stats)
    except (OSError, ValueError) as e:
        err = _tokenizer_error(e, policy_cfg)
        if err is None:
            raise
        raise err from e


def save_policy(folder: Path, policy: Any, preprocessor: Any, postprocessor: Any) -> Path:
    """Policy + processors in lerobot's format (``save_pretrained``), loadable by ``from_pretrained``.

    A twin's folder also gets ``cl_vla_twin.json`` (its sizes): :func:`load_policy` rebuilds pi0 /
    pi0.5 / GR00T twins with them; SmolVLA twins load with lerobot alone.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(folder))
    if preprocessor is not None:
        preprocessor.save_pretrained(str(folder))
    if postprocessor is not None:
        postprocessor.save_pretrained(str(folder))
    write_twin_file(folder, twin_of(policy.config))
    return folder


def load_policy(folder: Path, device: str = "cpu") -> tuple[Any, Any, Any]:
    """``(policy, preprocessor, postprocessor)`` from a folder written by :func:`save_policy` or by
    lerobot, with lerobot's ``from_pretrained``, offline."""
    import lerobot.policies  # noqa: F401
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    import cl_vla.policies  # noqa: F401

    folder = Path(folder)
    twin = read_twin_file(folder)
    cfg = PreTrainedConfig.from_pretrained(str(folder))
    cfg.device = device
    with building(twin):
        policy = get_policy_class(cfg.type).from_pretrained(str(folder), config=cfg)
        pre, post = make_pre_post_processors(
            cfg,
            pretrained_path=str(folder),
            preprocessor_overrides={"device_processor": {"device": device}},
            postprocessor_overrides={},
        )
    from cl_vla.policies.twins import attach

    attach(policy.config, twin)
    policy.eval()
    return policy, pre, post
