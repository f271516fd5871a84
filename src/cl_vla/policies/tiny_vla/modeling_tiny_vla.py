"""TinyVLA: a small vision-language-action policy that trains on a CPU.

Architecture (about 1.2M parameters with the defaults):

    instruction --HashedTokenizer--> ids --embeddings + 1-layer transformer + attention pool--> l (text_dim)
    each camera --resize--> shared conv net, FiLM-conditioned on l --> feature (+ camera embedding)
    state -------------------------------------------------------> MLP feature
    [camera features, state feature, projected l] --fusion MLP--> chunk_size x action_dim

The instruction enters twice on purpose: FiLM makes it change *what the vision sees* (which object is
relevant), the late concatenation lets it change *what to do* with the same view.

The instruction encoders (hashed tokens, or frozen precomputed embeddings) are in
:mod:`cl_vla.policies.tiny_vla.text_encoder_tiny_vla`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE
from torch import Tensor, nn

from cl_vla.policies.tiny_vla.configuration_tiny_vla import TinyVLAConfig
from cl_vla.policies.tiny_vla.text_encoder_tiny_vla import make_text_encoder

TASK_KEY = "task"
ACTION_IS_PAD_KEY = "action_is_pad"


# ----------------------------------------------------------------------------------------------- vision


class FiLMConvEncoder(nn.Module):
    """Shared conv net over all cameras, each stage after the stem FiLM-modulated by the instruction.

    Stem: stride-4 patchify conv (cheap on CPU). Then 3x3 convs, stride 1 for the first and 2 after.
    FiLM's generator is zero-initialized so training starts from the unconditioned network and
    learns how much the instruction should reshape each stage.
    """

    def __init__(self, config: TinyVLAConfig, in_channels: int):
        super().__init__()
        chans = list(config.conv_channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, chans[0], kernel_size=4, stride=4),
            nn.GroupNorm(_groups(chans[0]), chans[0]),
            nn.SiLU(),
        )
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(itertools.pairwise(chans)):
            self.stages.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=1 if i == 0 else 2, padding=1))
            self.norms.append(nn.GroupNorm(_groups(c_out), c_out))
        self.film_sizes = chans[1:]
        self.film = nn.Linear(config.text_dim, 2 * sum(self.film_sizes))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        # Keep a small spatial map (not a global average): where things are matters for manipulation.
        self.reduce = nn.Conv2d(chans[-1], 32, kernel_size=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.out = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 16, config.feature_dim), nn.LayerNorm(config.feature_dim)
        )

    def forward(self, images: Tensor, instruction: Tensor) -> Tensor:
        """``images`` (N, C, H, W) in [-1, 1]; ``instruction`` (N, text_dim) -> (N, feature_dim)."""
        x = self.stem(images)
        film = self.film(instruction).split([2 * c for c in self.film_sizes], dim=-1)
        for conv, norm, params in zip(self.stages, self.norms, film, strict=True):
            gamma, beta = params[:, :, None, None].chunk(2, dim=1)
            x = F.silu(norm(conv(x)) * (1 + gamma) + beta)
        return self.out(self.pool(self.reduce(x)))


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when they divide the channel count, else a single group."""
    return 8 if channels % 8 == 0 else 1


# ------------------------------------------------------------------------------------------------ model


class TinyVLAModel(nn.Module):
    """The network: batch dict -> normalized action chunk, instruction vector and fused features."""

    def __init__(self, config: TinyVLAConfig):
        super().__init__()
        self.config = config
        self.image_keys = list(config.image_features)
        self.state_keys = [key for key in (OBS_STATE, OBS_ENV_STATE) if key in (config.input_features or {})]
        self.action_dim = config.action_feature.shape[0]
        d = config.feature_dim

        self.text_encoder = make_text_encoder(config)
        self.text_proj = nn.Sequential(nn.Linear(config.text_dim, d), nn.LayerNorm(d))
        n_tokens = 1
        if self.image_keys:
            in_channels = config.image_features[self.image_keys[0]].shape[0]
            self.vision = FiLMConvEncoder(config, in_channels)
            self.camera_embedding = nn.Parameter(torch.randn(len(self.image_keys), d) * 0.02)
            n_tokens += len(self.image_keys)
        if self.state_keys:
            state_dim = sum(config.input_features[k].shape[0] for k in self.state_keys)
            self.state_mlp = nn.Sequential(
                nn.Linear(state_dim, d), nn.SiLU(), nn.Linear(d, d), nn.LayerNorm(d)
            )
            n_tokens += 1
        h = config.hidden_dim
        self.trunk = nn.Sequential(
            nn.Linear(n_tokens * d, h),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(h, h),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.action_head = nn.Linear(h, config.chunk_size * self.action_dim)
        nn.init.normal_(self.action_head.weight, std=1e-3)
        nn.init.zeros_(self.action_head.bias)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        batch_size = _batch_size(batch, self.image_keys + self.state_keys)
        instruction = self.text_encoder(_instructions(batch, batch_size))
        tokens = [self.text_proj(instruction)]
        if self.image_keys:
            images = torch.cat([self._prepare_image(batch[key]) for key in self.image_keys])
            n_cams = len(self.image_keys)
            feats = self.vision(images, instruction.repeat(n_cams, 1)).view(n_cams, batch_size, -1)
            tokens.extend(feats + self.camera_embedding[:, None, :])
        if self.state_keys:
            tokens.append(self.state_mlp(torch.cat([_last_step(batch[k], 2) for k in self.state_keys], -1)))
        features = self.trunk(torch.cat(tokens, dim=-1))
        actions = self.action_head(self.dropout(features))
        return {
            "action_pred": actions.view(batch_size, self.config.chunk_size, self.action_dim),
            "instruction_embedding": instruction,
            "features": features,
        }

    def _prepare_image(self, image: Tensor) -> Tensor:
        """Last obs step, float, resized to ``image_size`` and mapped from [0, 1] to [-1, 1]."""
        image = _last_step(image, 4)
        if not image.is_floating_point():
            image = image.float() / 255.0
        size = self.config.image_size
        if image.shape[-2:] != (size, size):
            image = F.interpolate(
                image, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return image * 2.0 - 1.0


def _batch_size(batch: dict[str, Any], keys: Sequence[str]) -> int:
    for key in keys:
        if key in batch:
            return batch[key].shape[0]
    task = batch.get(TASK_KEY)
    if isinstance(task, (list, tuple)):
        return len(task)
    raise ValueError(f"Cannot infer the batch size: none of {list(keys)} is in the batch.")


def _instructions(batch: dict[str, Any], batch_size: int) -> list[str]:
    """``batch["task"]`` as one string per sample; a missing task means an empty instruction."""
    task = batch.get(TASK_KEY)
    if task is None:
        return [""] * batch_size
    if isinstance(task, str):
        return [task] * batch_size
    texts = [str(t) for t in task]
    if len(texts) != batch_size:
        raise ValueError(f"batch['task'] has {len(texts)} instructions for a batch of {batch_size} samples.")
    return texts


def _last_step(x: Tensor, ndim: int) -> Tensor:
    """Drop an ``n_obs_steps`` axis (keeping the newest step) when a tensor has one."""
    return x[:, -1] if x.dim() == ndim + 1 else x


# ----------------------------------------------------------------------------------------------- policy


class TinyVLAPolicy(PreTrainedPolicy):
    """lerobot policy wrapper: loss, action chunking and the action queue around :class:`TinyVLAModel`."""

    config_class = TinyVLAConfig
    name = "tiny_vla"

    def __init__(self, config: TinyVLAConfig, **kwargs: Any):
        # make_policy passes dataset_stats / dataset_meta; normalization lives in the processors.
        super().__init__(config)
        config.validate_features()
        self.config: TinyVLAConfig = config
        self.model = TinyVLAModel(config)
        self.reset()

    def get_optim_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def reset(self) -> None:
        """Empty the action queue; call on every environment reset."""
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)

    def compute_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Differentiable model outputs for a (preprocessed) batch.

        Returns ``action_pred`` (B, chunk_size, action_dim) in normalized action space,
        ``instruction_embedding`` (B, text_dim) and ``features`` (B, hidden_dim), the trunk's output
        before the action head (for feature distillation). Respects the current train/eval mode.
        """
        return self.model(batch)

    def action_loss(
        self, pred: Tensor, target: Tensor, action_is_pad: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
        """L1/MSE between chunks, ignoring padded steps; ``reduction="none"`` gives one value per sample."""
        if target.dim() == 2:
            target = target.unsqueeze(1)
        if target.shape != pred.shape:
            raise ValueError(
                f"The action target has shape {tuple(target.shape)}, expected {tuple(pred.shape)} "
                f"(build the dataset with delta_timestamps for chunk_size={self.config.chunk_size})."
            )
        err = (pred - target).abs() if self.config.loss == "l1" else (pred - target).square()
        if action_is_pad is None:
            valid = torch.ones(err.shape[:2], dtype=err.dtype, device=err.device)
        else:
            valid = (~action_is_pad.bool()).to(err.dtype)
        err = err * valid.unsqueeze(-1)
        if reduction == "none":
            return err.sum(dim=(1, 2)) / (valid.sum(1) * err.shape[-1]).clamp_min(1)
        if reduction == "mean":
            return err.sum() / (valid.sum() * err.shape[-1]).clamp_min(1)
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")

    def forward(self, batch: dict[str, Any], reduction: str = "mean") -> tuple[Tensor, dict[str, float]]:
        """Training loss over the action chunk (padded steps masked) and python floats for logging."""
        outputs = self.compute_outputs(batch)
        loss = self.action_loss(
            outputs["action_pred"], batch[ACTION], batch.get(ACTION_IS_PAD_KEY), reduction
        )
        if torch._C._are_functorch_transforms_active():
            # Under torch.func (EWC's per-sample Fisher) .item() cannot be traced; nothing logs there.
            return loss, {}
        mean_loss = loss.mean().item()
        # The differentiable chunk rides along (only numbers are logged): output distillation (LwF,
        # DER++) reads it instead of running the student a second time.
        return loss, {
            "loss": mean_loss,
            f"{self.config.loss}_loss": mean_loss,
            "action_pred": outputs["action_pred"],
        }

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """The normalized action chunk (B, chunk_size, action_dim), in eval mode."""
        self.eval()
        return self.compute_outputs(batch)["action_pred"]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Any], **kwargs: Any) -> Tensor:
        """One action (B, action_dim); re-plans a chunk every ``n_action_steps`` calls."""
        self.eval()
        if not self._action_queue:
            chunk = self.predict_action_chunk(batch)[:, : self.config.n_action_steps]
            self._action_queue.extend(chunk.transpose(0, 1))
        return self._action_queue.popleft()
