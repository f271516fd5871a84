"""Which training recipe a run uses: the policy's own lerobot presets, or the ``trainer`` group's.

lerobot policies carry their fine-tuning recipe (``get_optimizer_preset``: AdamW lr, betas, eps,
weight decay, gradient clip; ``get_scheduler_preset``: warmup + cosine decay). The hub VLAs' model
configs select it (``recipe: policy``), and users change it the lerobot way, through the policy's own
fields (``model.optimizer_lr=...``, ``model.scheduler_warmup_steps=...``). ``recipe: trainer`` (the
default, e.g. tiny_vla) uses ``trainer.lr`` / ``weight_decay`` / ``warmup_steps`` / ``min_lr_ratio`` /
``grad_clip_norm``.

The schedule restarts at every task (cl_vla's contract: a pure function of the step in the task), so
the preset's warmup and decay are fitted into one task's steps as lerobot does for short runs
(``CosineDecayWithWarmupSchedulerConfig.build``: scaled by ``steps_per_task / num_decay_steps``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cl_vla.errors import ConfigError, one_of

RECIPES = ("trainer", "policy")


@dataclass(frozen=True)
class Recipe:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip_norm: float | None
    source: str

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`cl_vla.training.module.CLPolicyModule`."""
        d = asdict(self)
        for k in ("grad_clip_norm", "source"):
            d.pop(k)
        return d


def training_recipe(recipe: str | None, policy_cfg: Any, trainer_cfg: Any, steps_per_task: int) -> Recipe:
    """The optimizer and per-task schedule settings of a run."""
    recipe = recipe or "trainer"
    if recipe not in RECIPES:
        raise ConfigError(f"model.recipe={recipe!r} is not allowed; choose {one_of(RECIPES)}.")
    t = trainer_cfg
    if recipe == "trainer":
        return Recipe(
            lr=float(t.lr),
            weight_decay=float(t.weight_decay),
            betas=(0.9, 0.999),  # torch's AdamW default, as before
            eps=1e-8,
            warmup_steps=int(t.warmup_steps),
            min_lr_ratio=float(t.min_lr_ratio),
            grad_clip_norm=t.grad_clip_norm,
            source="trainer",
        )
    opt = policy_cfg.get_optimizer_preset()
    sched = policy_cfg.get_scheduler_preset()
    warmup = int(getattr(sched, "num_warmup_steps", 0) or 0)
    decay_steps = int(getattr(sched, "num_decay_steps", 0) or 0)
    if decay_steps > steps_per_task:  # lerobot's own scaling for runs shorter than the decay
        warmup = int(warmup * steps_per_task / decay_steps)
    peak, floor = getattr(sched, "peak_lr", None), getattr(sched, "decay_lr", None)
    min_ratio = float(floor / peak) if peak and floor is not None else float(t.min_lr_ratio)
    return Recipe(
        lr=float(opt.lr),
        weight_decay=float(opt.weight_decay),
        betas=tuple(float(b) for b in opt.betas),  # type: ignore[arg-type]
        eps=float(opt.eps),
        warmup_steps=min(warmup, max(steps_per_task - 1, 0)),
        min_lr_ratio=min_ratio,
        grad_clip_norm=getattr(opt, "grad_clip_norm", None),
        source=f"{policy_cfg.type} presets",
    )
