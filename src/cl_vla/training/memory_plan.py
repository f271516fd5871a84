"""What a run's continual-learning state will cost, printed before training, and refused when it cannot fit.

At 0.45-3.3 B parameters the per-parameter state of EWC, SI, GEM, LwF and PackNet, multiplied by the
tasks of a sequence, decides whether a run fits a GPU at all. The plan counts the model's real
parameters (for the command: built on PyTorch's ``meta`` device, no weights), the ones that train
(``train_expert_only``, ``freeze_vision_encoder``, LoRA), and applies each algorithm's storage rule as
cl_vla implements it (state in fp32 on the training device; see the table of rules below). Training
memory beyond that: fp32 weights, gradients and AdamW's two moments of the trainable parameters.
Activations depend on batch size and sequence length and are not counted: the plan is a lower bound.

    python -m cl_vla.training.memory_plan model=pi0 algorithm=ewc task_sequence=libero_spatial
    python -m cl_vla.training.memory_plan model=pi0 algorithm=ewc trainer=fsdp trainer.devices=8
    python -m cl_vla.training.memory_plan --table   # hub VLAs x algorithms, 10 tasks, 1 and 8 x 80 GB

Under ``trainer.strategy=fsdp`` over N GPUs each GPU holds 1/N of the weights, gradients, AdamW moments
and per-parameter CL state (dataset references stay whole on every rank).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cl_vla.algorithms.state_placement import PLACEABLE
from cl_vla.errors import CLVLAError

GB = 1024**3
FP32 = 4

#: Per algorithm: (what it keeps, bytes as a function of P trainable, N total params, T tasks, hparams).
#: Reference memories (ER, DER++, MIR, GEM, A-GEM) store 8-byte dataset references, not frames.
RULES: dict[str, tuple[str, Callable[[int, int, int, Mapping[str, Any]], float]]] = {
    "sequential": ("nothing", lambda P, N, T, h: 0),
    "multitask": ("nothing (all tasks' frames are streamed)", lambda P, N, T, h: 0),
    "er": ("8 B references per stored frame", lambda P, N, T, h: 8 * T * h.get("buffer_size_per_task", 500)),
    "derpp": (
        "references + recorded action chunks per stored frame",
        lambda P, N, T, h: T * h.get("buffer_size_per_task", 500) * (8 + FP32 * h.get("chunk_x_action", 350)),
    ),
    "mir": (
        "references + one virtual copy of the trainable weights per step",
        lambda P, N, T, h: 8 * T * h.get("buffer_size_per_task", 500) + FP32 * P,
    ),
    "ewc": ("Fisher + anchor per trainable parameter per task", lambda P, N, T, h: 2 * FP32 * P * T),
    "ewc_online": (
        "one running Fisher + one anchor per trainable parameter",
        lambda P, N, T, h: 2 * FP32 * P,
    ),
    "si": ("omega, Omega, anchor, task start per trainable parameter", lambda P, N, T, h: 4 * FP32 * P),
    "lwf": ("a frozen teacher copy of the whole policy", lambda P, N, T, h: FP32 * N),
    "gem": (
        "one gradient per past task, every step (+ references)",
        lambda P, N, T, h: FP32 * P * max(T - 1, 0) + 8 * T * h.get("memory_per_task", 256),
    ),
    "agem": (
        "one reference gradient (+ references)",
        lambda P, N, T, h: FP32 * P + 8 * T * h.get("memory_per_task", 1000),
    ),
    "packnet": ("a uint8 owner mask per trainable parameter", lambda P, N, T, h: P),
    "lora_per_task": (
        "one LoRA adapter per task (A and B of every adapted layer)",
        lambda P, N, T, h: FP32 * T * h.get("lora_params", 0),
    ),
}


#: The part of each rule that is dataset references (8 B each), kept whole on every rank; the rest of a
#: rule is per-parameter state, which FSDP shards like the parameters (cl_vla.algorithms.sharded).
REFERENCES: dict[str, Callable[[int, Mapping[str, Any]], float]] = {
    "er": lambda T, h: 8 * T * h.get("buffer_size_per_task", 500),
    "derpp": lambda T, h: T * h.get("buffer_size_per_task", 500) * (8 + FP32 * h.get("chunk_x_action", 350)),
    "mir": lambda T, h: 8 * T * h.get("buffer_size_per_task", 500),
    "gem": lambda T, h: 8 * T * h.get("memory_per_task", 256),
    "agem": lambda T, h: 8 * T * h.get("memory_per_task", 1000),
}


def fsdp_supported(algorithm: str) -> bool:
    """Whether ``algorithm`` runs under ``trainer.strategy=fsdp`` (its state sharded)."""
    from cl_vla.config.strategy import FSDP_UNSUPPORTED

    return algorithm not in FSDP_UNSUPPORTED


@dataclass
class ModelSize:
    name: str
    total: int
    trainable: int
    lora_params: int = 0  # parameters of one LoRA adapter (r=16 on the policy's default targets)
    source: str = ""


@dataclass
class Plan:
    model: ModelSize
    algorithm: str
    tasks: int
    hparams: dict[str, Any] = field(default_factory=dict)
    device: str = "cuda"
    #: FSDP over this many GPUs (1: one device holds everything, as under DDP on each GPU).
    shards: int = 1
    #: ``algorithm.state_dtype`` / ``state_device`` (EWC, online EWC, SI; cl_vla.algorithms.state_placement).
    state_dtype: str = "float32"
    state_device: str = "params"

    @property
    def _placeable(self) -> float:
        """fp32 bytes of the state that ``state_dtype`` / ``state_device`` apply to (SI's running
        omega, one of its four tensors, stays fp32 with the parameters)."""
        if self.algorithm not in PLACEABLE:
            return 0.0
        full = self._rule_bytes
        return full * 3 / 4 if self.algorithm == "si" else full

    @property
    def _rule_bytes(self) -> float:
        m = self.model
        return RULES[self.algorithm][1](
            m.trainable, m.total, self.tasks, {**self.hparams, "lora_params": m.lora_params}
        )

    @property
    def state_bytes(self) -> float:
        """The CL state in all, in the precision it is kept in, wherever it is kept."""
        scale = 0.5 if self.state_dtype == "bfloat16" else 1.0
        return self._rule_bytes - self._placeable * (1 - scale)

    @property
    def host_state_bytes(self) -> float:
        """The part kept in pinned host memory (``state_device=cpu``)."""
        return self._placeable * (0.5 if self.state_dtype == "bfloat16" else 1.0) if self._offloaded else 0.0

    @property
    def device_state_bytes(self) -> float:
        """The CL state on the training device. With host state, what a step brings over: one task's
        Fisher and anchor upcast plus the penalty's gradient sum (EWC), Omega and the anchor (SI)."""
        if not self._offloaded:
            return self.state_bytes
        P = self.model.trainable
        return (
            self.state_bytes - self.host_state_bytes + 3 * FP32 * P
            if self.algorithm != "si"
            else (self.state_bytes - self.host_state_bytes + 2 * FP32 * P)
        )

    @property
    def _offloaded(self) -> bool:
        return self.state_device == "cpu" and self.algorithm in PLACEABLE

    @property
    def training_bytes(self) -> float:
        """fp32 weights of the whole policy + gradients and AdamW moments of what trains."""
        trainable = self.model.lora_params if self.algorithm == "lora_per_task" else self.model.trainable
        return FP32 * self.model.total + 3 * FP32 * trainable

    @property
    def total_bytes(self) -> float:
        """Device memory on one device (CL state there + training memory)."""
        return self.device_state_bytes + self.training_bytes

    @property
    def reference_bytes(self) -> float:
        rule = REFERENCES.get(self.algorithm)
        return 0.0 if rule is None else rule(self.tasks, self.hparams)

    @property
    def per_gpu_bytes(self) -> float:
        """What one GPU holds: everything, or under FSDP over ``shards`` GPUs 1/N of the weights,
        gradients, optimizer and per-parameter CL state (references stay whole on every rank)."""
        if self.shards <= 1:
            return self.total_bytes
        sharded = self.training_bytes + self.device_state_bytes - self.reference_bytes
        return sharded / self.shards + self.reference_bytes

    def sharded(self, gpus: int) -> Plan:
        """This plan under ``trainer.strategy=fsdp`` over ``gpus`` GPUs."""
        return replace(self, shards=gpus)

    def placed(self, dtype: str | None = None, device: str | None = None) -> Plan:
        """This plan with the state kept in ``dtype`` and/or on ``device``."""
        return replace(self, state_dtype=dtype or self.state_dtype, state_device=device or self.state_device)

    def lines(self) -> list[str]:
        m = self.model
        what = RULES[self.algorithm][0]
        return [
            f"memory plan: {m.name} ({_count(m.total)} parameters, {_count(m.trainable)} train), "
            f"algorithm={self.algorithm}, {self.tasks} tasks",
            f"  CL state: {_fmt(self.state_bytes)} ({self._where()}): {what}",
            f"  training: {_fmt(self.training_bytes)} "
            "(fp32 weights, gradients, AdamW moments; activations not counted)",
            f"  total:    {_fmt(self.total_bytes)}",
            *(
                [f"  per GPU:  {_fmt(self.per_gpu_bytes)} (FSDP over {self.shards} GPUs)"]
                if self.shards > 1
                else []
            ),
        ]

    def _where(self) -> str:
        dtype = "bf16" if self.state_dtype == "bfloat16" else "fp32"
        if self._offloaded:
            return (
                f"{dtype}; {_fmt(self.host_state_bytes)} in pinned host memory, "
                f"{_fmt(self.device_state_bytes)} on the {self.device} device in a step"
            )
        return f"{dtype}, on the training device ({self.device})"

    def fit_option(self, capacity: float, gpus: int = 1) -> str:
        """``"fits"``, else the first option that makes it fit ``gpus`` GPUs of ``capacity`` bytes each,
        else ``"none"``. In order, first those that keep the algorithm and what trains: as configured
        (one GPU's worth on each), bf16 state, FSDP over the GPUs (with bf16 state), state in host
        memory (not under FSDP); then those that change the experiment, alone and under FSDP."""
        if self.per_gpu_bytes <= capacity:
            return "fits"
        can_shard = gpus > 1 and fsdp_supported(self.algorithm)
        bf16 = "algorithm.state_dtype=bfloat16"
        same: list[tuple[str, Plan]] = []
        if self.algorithm in PLACEABLE and self.state_dtype != "bfloat16":
            same.append((bf16, self.placed(dtype="bfloat16")))
        if can_shard:
            same.append((f"FSDP x {gpus}", self.sharded(gpus)))
            if self.algorithm in PLACEABLE and self.state_dtype != "bfloat16":
                same.append((f"FSDP x {gpus} + {bf16}", self.sharded(gpus).placed(dtype="bfloat16")))
        if self.algorithm in PLACEABLE and self.state_device != "cpu":
            same.append(("algorithm.state_device=cpu", self.placed(device="cpu")))
        for label, plan in same:
            if plan.per_gpu_bytes <= capacity:
                return label
        for label, plan in self.alternatives():
            if plan.per_gpu_bytes <= capacity:
                return label
            if gpus > 1 and fsdp_supported(plan.algorithm) and plan.sharded(gpus).per_gpu_bytes <= capacity:
                return f"FSDP x {gpus} + {label}"
        return "none"

    def alternatives(self) -> list[tuple[str, Plan]]:
        out: list[tuple[str, Plan]] = []
        swap = {"ewc": "ewc_online", "gem": "agem", "lwf": "derpp"}.get(self.algorithm)
        if swap:
            out.append((f"algorithm={swap}", Plan(self.model, swap, self.tasks, self.hparams, self.device)))
        expert = self.model.__dict__.get("expert_only")
        if expert is not None and expert.trainable < self.model.trainable:
            out.append(
                ("train_expert_only", Plan(expert, self.algorithm, self.tasks, self.hparams, self.device))
            )
            if swap:
                out.append(
                    (
                        f"train_expert_only + algorithm={swap}",
                        Plan(expert, swap, self.tasks, self.hparams, self.device),
                    )
                )
        if self.model.lora_params and self.algorithm != "lora_per_task":
            lora = ModelSize(
                self.model.name, self.model.total, self.model.lora_params, self.model.lora_params
            )
            out.append(("LoRA r=16", Plan(lora, self.algorithm, self.tasks, self.hparams, self.device)))
        return out


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return str(int(n))


def _fmt(b: float) -> str:
    if b >= 0.1 * GB:
        return f"{b / GB:,.1f} GB"
    return f"{b / 1024**2:,.1f} MB" if b >= 0.1 * 1024**2 else f"{b / 1024:,.1f} KB"


# ---- counting parameters -----------------------------------------------------------------------------


def count_policy(policy: Any, name: str) -> ModelSize:
    """Counts of a built policy (the run's own, at start-up)."""
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return ModelSize(name, total, trainable, source="the run's policy")


def _lora_params(model: Any, r: int = 16) -> int:
    """Parameters of one rank-``r`` adapter on the policy's lerobot PEFT targets (Linear layers)."""
    import re

    import torch

    getter = getattr(model, "_get_default_peft_targets", None)
    targets = (getter() or {}).get("target_modules") if getter else None
    pattern = targets if isinstance(targets, str) else None
    n = 0
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (pattern is None or re.fullmatch(pattern, mod_name)):
            n += r * (mod.in_features + mod.out_features)
    return n


def _meta_policy(model_type: str, expert_only: bool | None) -> Any:
    """The full-size lerobot policy on the meta device (no memory, no weights, no hub)."""
    import lerobot.policies  # noqa: F401
    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import get_policy_class

    kwargs: dict[str, Any] = {"device": "cpu"}
    if model_type == "smolvla":
        from cl_vla.policies.twins.real_configs import smolvlm2_500m_folder

        kwargs.update(vlm_model_name=str(smolvlm2_500m_folder()), load_vlm_weights=False)
    if expert_only is not None and model_type in ("smolvla", "pi0", "pi05"):
        kwargs["train_expert_only"] = expert_only
    cfg = PreTrainedConfig.get_choice_class(model_type)(**kwargs)
    cfg.input_features = {
        "observation.images.image": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)),
        "observation.state": PolicyFeature(FeatureType.STATE, (8,)),
    }
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (7,))}
    cls = get_policy_class(model_type)
    to = torch.nn.Module.to
    try:
        # lerobot moves the model to config.device inside __init__; on meta there is nothing to move.
        torch.nn.Module.to = lambda self, *a, **k: self  # type: ignore[method-assign]
        with torch.device("meta"):
            if model_type == "groot":
                from cl_vla.policies.twins.real_configs import groot_meta_policy

                return groot_meta_policy(cfg)
            return cls(cfg)
    finally:
        torch.nn.Module.to = to  # type: ignore[method-assign]


def count_hub_model(model_type: str) -> ModelSize:
    """Full-size counts of a hub VLA with its default fine-tuning settings, built on the meta device."""
    policy = _meta_policy(model_type, None)
    size = count_policy(policy, model_type)
    size.lora_params = _lora_params(policy)
    size.source = "built on the meta device"
    if model_type in ("smolvla", "pi0", "pi05"):
        expert = count_policy(_meta_policy(model_type, True), model_type)
        size.__dict__["expert_only"] = expert
    return size


# ---- start-up check ------------------------------------------------------------------------------------


def device_capacity(accelerator: str) -> tuple[str, float | None]:
    """``(device, bytes)`` the run trains on; ``None`` when unknown."""
    import torch

    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda", float(torch.cuda.get_device_properties(0).total_memory)
    try:
        import os

        return "cpu", float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return "cpu", None


class PlanDoesNotFitError(CLVLAError):
    """The CL state and training memory exceed the device before the first step."""


def plan_for_run(cfg: Any, policy: Any, tasks: int) -> Plan:
    from omegaconf import OmegaConf

    algo = str(cfg.algorithm.get("name", "?"))
    hparams = OmegaConf.to_container(cfg.algorithm, resolve=True)
    size = count_policy(policy, str(cfg.model.type))
    if algo == "lora_per_task":
        from cl_vla.policies.lora import lora_parameters

        size.lora_params = sum(p.numel() for _, p in lora_parameters(policy)) or size.trainable
    device, _ = device_capacity(str(cfg.trainer.accelerator))
    rule = rule_name(algo, hparams)
    placement = {k: str(hparams[k]) for k in ("state_dtype", "state_device") if hparams.get(k) is not None}
    return Plan(size, rule, tasks, dict(hparams), device, shards=fsdp_shards(cfg, device), **placement)


def fsdp_shards(cfg: Any, device: str) -> int:
    """GPUs the run shards over (``trainer.strategy=fsdp`` on CUDA); 1 otherwise. CPU processes share
    one host's memory, so a CPU run is planned whole."""
    if str(cfg.trainer.strategy) != "fsdp" or device != "cuda":
        return 1
    from cl_vla.training.trainer import fsdp_devices

    return fsdp_devices(cfg.trainer) * int(cfg.trainer.num_nodes)


def rule_name(algo: str, hparams: dict) -> str:
    """The cost rule of ``algo``: EWC's by its ``mode`` (``algorithm=ewc algorithm.mode=online`` keeps one
    Fisher); an algorithm without a rule is said, not silently counted as free."""
    if algo in ("ewc", "ewc_online") and hparams.get("mode") in ("online", "separate"):
        return "ewc_online" if hparams["mode"] == "online" else "ewc"
    if algo not in RULES:
        warnings.warn(
            f"memory plan: no cost rule for algorithm={algo!r}; its CL state is not counted "
            "(add one to cl_vla.training.memory_plan.RULES).",
            stacklevel=2,
        )
        return "sequential"
    return algo


def check_run(cfg: Any, policy: Any, tasks: int, print_fn: Callable[[str], None] = print) -> Plan:
    """Print the plan; refuse (one sentence) when it cannot fit the device, before the first step."""
    plan = plan_for_run(cfg, policy, tasks)
    for line in plan.lines():
        print_fn(line)
    device, capacity = device_capacity(str(cfg.trainer.accelerator))
    if capacity is not None and plan.per_gpu_bytes > capacity:
        option = plan.fit_option(capacity)
        hint = f"; {option} would fit" if option not in ("fits", "none") else ""
        raise PlanDoesNotFitError(
            f"algorithm={plan.algorithm} on {plan.model.name} over {tasks} tasks needs at least "
            f"{_fmt(plan.per_gpu_bytes)} per device ({_fmt(plan.state_bytes)} of CL state in all), "
            "more than the "
            f"{_fmt(capacity)} of the {device} device{hint}."
        )
    return plan


# ---- command -------------------------------------------------------------------------------------------

HUB_MODELS = ("smolvla", "pi0", "pi05", "groot")


def markdown_table(tasks: int = 10, capacity_gb: float = 80.0, gpus: int = 8) -> str:
    """Every hub VLA x every algorithm: CL state, total, per GPU under FSDP over ``gpus``, and the option
    that fits one GPU of ``capacity_gb`` and ``gpus`` of them."""
    from cl_vla.paths import conf_dir
    from cl_vla.results.tables import markdown_table as table

    algos = sorted(p.stem for p in (conf_dir() / "algorithm").glob("*.yaml"))
    head = ["model", "parameters (train)", "algorithm", f"CL state ({tasks} tasks)", "total (1 GPU)"]
    head += [
        f"per GPU, FSDP x {gpus}",
        f"fits 1 x {capacity_gb:.0f} GB with",
        f"fits {gpus} x {capacity_gb:.0f} GB with",
    ]
    rows = []
    for model in HUB_MODELS:
        size = count_hub_model(model)
        for algo in algos:
            plan = Plan(size, algo, tasks)
            one, many = (plan.fit_option(capacity_gb * GB, g) for g in (1, gpus))
            shard = _fmt(plan.sharded(gpus).per_gpu_bytes) if fsdp_supported(algo) else "not sharded yet"
            params = f"{size.total / 1e9:.2f} B ({size.trainable / 1e9:.2f} B)"
            fits = ["as configured" if f == "fits" else f for f in (one, many)]
            rows.append([model, params, algo, _fmt(plan.state_bytes), _fmt(plan.total_bytes), shard, *fits])
    return table(head, rows)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--table" in argv:
        print(markdown_table())
        return
    from hydra import compose, initialize_config_dir

    from cl_vla.config.schema import register_configs
    from cl_vla.data.task_sequences import TaskSequence
    from cl_vla.paths import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=argv)
    from omegaconf import OmegaConf

    seq = TaskSequence.from_mapping(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    model_type = str(cfg.model.type)
    algo = str(cfg.algorithm.get("name"))
    if model_type in HUB_MODELS and cfg.model.get("twin") is None:
        size = count_hub_model(model_type)
    else:
        size = _count_configured(cfg)
    device, capacity = device_capacity(str(cfg.trainer.accelerator))
    hparams = OmegaConf.to_container(cfg.algorithm, resolve=True)
    placement = {k: str(hparams[k]) for k in ("state_dtype", "state_device") if hparams.get(k) is not None}
    plan = Plan(size, algo, len(seq.tasks), hparams, device, shards=fsdp_shards(cfg, "cuda"), **placement)
    for line in plan.lines():
        print(line)
    for label, alt in plan.alternatives():
        print(f"  option {label}: total {_fmt(alt.total_bytes)} (CL state {_fmt(alt.state_bytes)})")
    if capacity is not None:
        print(f"  device: {device}, {_fmt(capacity)}: {plan.fit_option(capacity, plan.shards)}")


def _count_configured(cfg: Any) -> ModelSize:
    """Counts of a small configured model (tiny_vla, a twin): built for real on CPU (seconds)."""
    from omegaconf import OmegaConf

    from cl_vla.cli import prepare_data
    from cl_vla.policies.factory import make_policy

    data, policy_cfg = prepare_data(cfg)
    policy = make_policy(policy_cfg, data.dataset.meta)
    from cl_vla.policies.lora import apply_model_lora

    apply_model_lora(policy, OmegaConf.to_container(cfg.model, resolve=True).get("lora"))
    size = count_policy(policy, str(cfg.model.type))
    size.lora_params = _lora_params(policy)
    return size


if __name__ == "__main__":
    main()
