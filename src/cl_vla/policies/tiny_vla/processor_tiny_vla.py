"""Pre/post-processing pipelines of TinyVLA (lerobot resolves ``make_tiny_vla_pre_post_processors``)."""

from __future__ import annotations

from typing import Any

import torch
from lerobot.processor import PolicyAction, PolicyProcessorPipeline
from lerobot.processor.factory import make_default_policy_processor_steps, make_policy_processor_pipelines

from cl_vla.policies.tiny_vla.configuration_tiny_vla import TinyVLAConfig


def make_tiny_vla_pre_post_processors(
    config: TinyVLAConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """Build ``(preprocessor, postprocessor)`` for TinyVLA.

    Preprocessor: rename -> add batch dim (also wraps a single ``task`` str in a list) -> device ->
    normalize. Postprocessor: unnormalize -> cpu. The instruction needs no processor step: the
    policy tokenizes ``batch["task"]`` itself with its own offline tokenizer.
    """
    steps = make_default_policy_processor_steps(config, dataset_stats)
    return make_policy_processor_pipelines(
        input_steps=[steps.rename_observations, steps.add_batch_dim, steps.to_device, steps.normalize],
        output_steps=[steps.unnormalize, steps.to_cpu],
    )
