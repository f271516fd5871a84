"""Configuration of TinyVLA, cl_vla's small CPU-trainable vision-language-action policy.

Registered with lerobot's draccus registry under ``"tiny_vla"``, so ``make_policy_config``,
``get_policy_class`` and ``make_pre_post_processors`` find the sibling ``modeling_tiny_vla`` and
``processor_tiny_vla`` modules by lerobot's naming convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import NormalizationMode, PreTrainedConfig
from lerobot.optim import AdamWConfig

HASHED_TEXT_ENCODER = "hashed"
FROZEN_TEXT_ENCODER_PREFIX = "frozen:"
LOSSES = ("l1", "mse")


@PreTrainedConfig.register_subclass("tiny_vla")
@dataclass
class TinyVLAConfig(PreTrainedConfig):
    """Hyper-parameters of :class:`~cl_vla.policies.tiny_vla.modeling_tiny_vla.TinyVLAPolicy`.

    Inputs: any number of ``observation.images.*`` cameras (all with the same channel count; any HxW,
    resized to ``image_size``), an optional ``observation.state`` and the instruction in
    ``batch["task"]``. Output: ``action``, predicted as a chunk of ``chunk_size`` steps.

    Args:
        chunk_size: Actions predicted per forward pass (the dataset's ``action_delta_indices``).
        n_action_steps: Actions of a chunk executed by ``select_action`` before re-planning.
        image_size: Side length every camera image is resized to before the conv encoder.
        conv_channels: Output channels of the conv stages; the first stage is a stride-4 patchify stem,
            later stages halve the resolution except the second (keeps 64px inputs at a 4x4 map).
        feature_dim: Width of each modality's feature (one per camera, one for state).
        hidden_dim: Width of the fusion MLP that predicts the action chunk.
        dropout: Dropout in the fusion MLP.
        text_encoder: ``"hashed"`` (own offline tokenizer + learned embeddings) or
            ``"frozen:<local path>"`` (a frozen Hugging Face encoder read only from that directory).
        vocab_buckets: Hash buckets of the hashed tokenizer (ids 0 and 1 are reserved for pad/CLS).
        max_text_tokens: Token budget per instruction, CLS included; the rest is truncated.
        use_bigrams: Also hash word bigrams, so "left of" differs from "of left".
        text_dim: Width of the instruction vector (and of the text transformer).
        text_layers: Transformer encoder layers over the instruction tokens (0 = attention pooling only).
        text_heads: Attention heads of the text transformer.
        tokenizer_cache_size: Instructions kept in the tokenizer's LRU cache (they repeat constantly).
        loss: ``"l1"`` or ``"mse"`` over the (unpadded) action chunk, in normalized action space.
    """

    n_obs_steps: int = 1
    chunk_size: int = 10
    n_action_steps: int = 10

    # Images are float in [0, 1] from lerobot datasets and are rescaled inside the model, so their
    # normalization does not depend on which statistics (whole dataset, first task, ...) the
    # continual run picked; state and action do use the chosen statistics.
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ENV": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )

    # Vision.
    image_size: int = 64
    conv_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 128])
    feature_dim: int = 128
    hidden_dim: int = 512
    dropout: float = 0.1

    # Language.
    text_encoder: str = HASHED_TEXT_ENCODER
    vocab_buckets: int = 4096
    max_text_tokens: int = 32
    use_bigrams: bool = True
    text_dim: int = 64
    text_layers: int = 1
    text_heads: int = 4
    tokenizer_cache_size: int = 4096

    # Training.
    loss: str = "l1"
    optimizer_lr: float = 1e-3
    optimizer_weight_decay: float = 1e-4
    optimizer_grad_clip_norm: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_obs_steps != 1:
            raise ValueError(f"TinyVLA handles only n_obs_steps=1, got n_obs_steps={self.n_obs_steps}.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(
                f"n_action_steps must be in [1, chunk_size={self.chunk_size}], got {self.n_action_steps}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        if self.text_encoder != HASHED_TEXT_ENCODER and not (
            self.text_encoder.startswith(FROZEN_TEXT_ENCODER_PREFIX)
            and len(self.text_encoder) > len(FROZEN_TEXT_ENCODER_PREFIX)
        ):
            raise ValueError(
                f"text_encoder must be 'hashed' or 'frozen:<local path>', got {self.text_encoder!r}."
            )
        if self.vocab_buckets < 3:
            raise ValueError(
                f"vocab_buckets must be >= 3 (pad and CLS are reserved), got {self.vocab_buckets}."
            )
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {self.max_text_tokens}.")
        if self.text_dim % self.text_heads != 0:
            raise ValueError(f"text_dim={self.text_dim} must be divisible by text_heads={self.text_heads}.")
        if not self.conv_channels:
            raise ValueError("conv_channels must list at least one stage, got an empty list.")
        if self.image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {self.image_size}.")

    @property
    def frozen_text_encoder_path(self) -> str | None:
        """The local directory of the frozen text encoder, or None for the hashed one."""
        if self.text_encoder.startswith(FROZEN_TEXT_ENCODER_PREFIX):
            return self.text_encoder[len(FROZEN_TEXT_ENCODER_PREFIX) :]
        return None

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> None:
        # A continual run restarts tasks many times; the schedule is the loop's decision, not the model's.
        return None

    def validate_features(self) -> None:
        if not self.image_features and self.robot_state_feature is None and self.env_state_feature is None:
            raise ValueError(
                "TinyVLA needs at least one 'observation.images.*', 'observation.state' or "
                "'observation.environment_state' input feature, got none."
            )
        if self.action_feature is None:
            raise ValueError("TinyVLA needs an 'action' output feature, got none.")
        channels = {key: ft.shape[0] for key, ft in self.image_features.items()}
        if len(set(channels.values())) > 1:
            raise ValueError(
                f"All cameras must have the same channel count (the conv encoder is shared), got {channels}."
            )

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None
