"""The inherent cost of each algorithm's extra work, timed in the bench's own process.

``make bench`` times every algorithm inside the training loop. Those figures alone cannot say whether a
slow algorithm is slow because of its math or because of its implementation. This module times the
*primitive operations* an algorithm's method needs beyond a plain fine-tuning step, written here
independently of ``cl_vla.algorithms`` (plain ``torch._foreach_*`` kernels, forwards and backwards), on
the same policy and real preprocessed batches, right after the ``sequential`` run of the same bench:

- EWC / online EWC: the quadratic penalty ``c * sum F (theta - theta*)^2``, forward and backward;
- SI: that penalty plus its path integral (copy theta, subtract, multiply-accumulate into omega);
- LwF: one no-grad forward of a frozen teacher on the batch, plus the distillation loss;
- DER++: the two loss terms on the replayed rows;
- for both, where the training forward does not give the distilled chunk (``action_pred``: lerobot's
  flow-matching VLAs, whose training forward draws a random time and noise), also the student's own
  forward and backward for it (``compute_outputs``, on the batch for LwF, on the replayed rows for
  DER++): the method needs that output with its gradient, and nothing else computes it;
- MIR: reading its candidates' frames, the virtual SGD step, two no-grad forwards over the candidates,
  a forward/backward on the top k;
- A-GEM / GEM (one past task): reading a memory batch's frames, one forward/backward on it, plus the
  projection;
- PackNet: masking the gradients and restoring frozen weights (three fused kernels);
- per-task LoRA: a step of the adapter model instead of the full one (may cost less than a step);
- ER, multitask, sequential: nothing (replay rides inside the batch of the same size).

Reading frames (decode, collate, preprocess; ``read_memory_batch``, ``read_candidates``) is timed in the
main process, as if it were serial. The algorithms that need it read ahead in loader workers, so where
a core is free they may come in under their limit; on a machine whose cores are all busy they cannot.

Each primitive is timed standalone, many times, interleaved with the others (so load on a shared
machine hits all alike), and its median is the extra time per step. The bench then sets the *limit*
of an algorithm at the measured ``sequential`` step time plus that extra, so ``measured / limit``
near 1 means the implementation adds nothing beyond its method's work.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call


@dataclass(frozen=True)
class ExtraWork:
    """What an algorithm adds to a step: a sentence and the primitives (``-name`` subtracts one)."""

    what: str
    primitives: tuple[str, ...] = ()


EXTRA_WORK: dict[str, ExtraWork] = {
    "sequential": ExtraWork("nothing"),
    "multitask": ExtraWork("nothing (a wider stream, same batch)"),
    "er": ExtraWork("nothing (replayed frames ride in the batch)"),
    "ewc": ExtraWork("quadratic penalty fwd+bwd", ("penalty",)),
    "ewc_online": ExtraWork("quadratic penalty fwd+bwd", ("penalty",)),
    "si": ExtraWork("quadratic penalty + path integral", ("penalty", "si_path_integral")),
    "lwf": ExtraWork(
        "teacher forward (no grad) + distill loss (+ the student's chunk fwd/bwd where the step has none)",
        ("teacher_forward", "distill_loss"),
    ),
    "derpp": ExtraWork(
        "loss terms on replayed rows (+ their chunk fwd/bwd where the step has none)", ("replay_loss_terms",)
    ),
    "mir": ExtraWork(
        "read candidates + virtual step + 2 fwd over them + fwd/bwd on top k",
        ("read_candidates", "virtual_step", "score_candidates", "retrieved_fwd_bwd"),
    ),
    "agem": ExtraWork(
        "read a memory batch + its fwd/bwd + projection",
        ("read_memory_batch", "memory_fwd_bwd", "projection"),
    ),
    "gem": ExtraWork(
        "read a memory batch per past task + its fwd/bwd + projection",
        ("read_memory_batch", "memory_fwd_bwd", "projection"),
    ),
    "packnet": ExtraWork("mask gradients, restore frozen weights", ("packnet_masks",)),
    "lora_per_task": ExtraWork("adapter-model step instead of a full step", ("lora_step", "-step")),
}


def extra_seconds(algorithm: str, medians: Mapping[str, float]) -> float | None:
    """The extra time per step of ``algorithm``'s method (None: unknown algorithm or primitive)."""
    work = EXTRA_WORK.get(algorithm)
    if work is None:
        return None
    total = 0.0
    for name in work.primitives:
        sign, key = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
        if key not in medians:
            return None
        total += sign * medians[key]
    return total


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 2, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Median seconds of each callable over ``reps`` rounds; every round calls all of them in turn."""
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _rows(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` rows of a collated batch (tensors and per-sample lists)."""
    size = next(len(v) for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and len(v) == size:
            out[k] = v[:n]
        elif isinstance(v, list | tuple) and len(v) == size:
            out[k] = type(v)(v[:n])
        else:
            out[k] = v
    return out


def _step_gives_chunk(policy: torch.nn.Module, batch: Mapping[str, Any]) -> bool:
    """Whether the policy's training forward returns the distilled chunk (``action_pred``) with its
    outputs, so LwF and DER++ need no forward of their own for the student (tiny_vla: yes)."""
    with torch.no_grad():
        out = policy.forward(dict(batch))
    info = out[1] if isinstance(out, tuple) and len(out) > 1 else None
    return isinstance(info, Mapping) and isinstance(info.get("action_pred"), Tensor)


def _loss(policy: torch.nn.Module, batch: Mapping[str, Any]) -> Tensor:
    out = policy.forward(dict(batch))
    return (out[0] if isinstance(out, tuple) else out).mean()


class Primitives:
    """The primitive operations of :data:`EXTRA_WORK`, on a copy of ``policy``.

    Args:
        policy: The trained policy (copied; the original is not touched).
        batch_of: ``n -> a preprocessed batch of n real training frames``, read from the dataset at
            every call (what reading a memory batch costs).
        batch_size: The training batch size (the plain step's).
        memory_batch: A-GEM / GEM's memory batch size.
        candidates, k: MIR's candidates scored and retrieved per step.
        replayed: Rows of a batch that are replayed (DER++'s ``floor(ratio * batch_size)``).
        grad_clip: The run's gradient clipping norm (None: none), part of every step.
        lora: Per-task LoRA's settings (``cl_vla.policies.lora.LoRASettings``); None skips ``lora_step``.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        batch_of: Callable[[int], dict],
        *,
        batch_size: int,
        memory_batch: int,
        candidates: int = 50,
        k: int = 10,
        replayed: int | None = None,
        grad_clip: float | None = None,
        lora: Any = None,
    ) -> None:
        self.policy = copy.deepcopy(policy).train()
        self.grad_clip = grad_clip
        self.batch_of, self.memory_batch, self.num_candidates = batch_of, memory_batch, candidates
        big = batch_of(max(batch_size, memory_batch, candidates))
        self.batch, self.memory, self.candidates = (
            _rows(big, batch_size),
            _rows(big, memory_batch),
            _rows(big, candidates),
        )
        self.k = k
        self.replayed = replayed if replayed is not None else batch_size // 2
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-6)
        self._step_model(self.policy, self.opt, self.params)  # every .grad exists from here on
        ps = [p.detach() for p in self.params]
        # Importance / anchor / running path integral: values do not change the cost, shapes do.
        self.weights = [torch.rand_like(p) for p in ps]
        self.anchors = [p.clone() for p in ps]
        self.omega = [torch.zeros_like(p) for p in ps]
        self.weighted = torch._foreach_mul(torch._foreach_sub(ps, self.anchors), self.weights)
        self.free = [(torch.rand_like(p) < 0.25).to(p.dtype) for p in ps]  # PackNet: a quarter free
        self.frozen_values = torch._foreach_mul(ps, torch._foreach_sub(self.free, 1.0))
        torch._foreach_neg_(self.frozen_values)  # theta * (1 - free)
        self.teacher = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.step_gives_chunk = _step_gives_chunk(self.policy, self.batch)
        self.lora = self._lora_model(lora) if lora is not None else None

    # ---- the plain step and its variants ------------------------------------------------------------

    def _step_model(self, model: torch.nn.Module, opt: torch.optim.Optimizer, params: list[Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, self.batch).backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()

    def step(self) -> None:
        """Forward, backward, clipping and AdamW at the training batch size: ``sequential``'s step."""
        self._step_model(self.policy, self.opt, self.params)

    def _lora_model(self, settings: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[Tensor]]:
        from cl_vla.policies.lora import activate_adapter, inject_lora, set_trainable

        model = copy.deepcopy(self.policy)
        inject_lora(model, copy.deepcopy(settings), "task_0")
        inject_lora(model, copy.deepcopy(settings), "task_1")  # the second task's, as in the bench
        activate_adapter(model, "task_1")
        set_trainable(model, "task_1")
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-6), params

    def lora_step(self) -> None:
        assert self.lora is not None
        self._step_model(*self.lora)

    # ---- element-wise work (EWC, SI, PackNet) -------------------------------------------------------

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self.params]

    def penalty(self) -> None:
        """``c * sum w (theta - theta*)^2``: forward (3 kernels + a reduction), backward into ``.grad``."""
        ps = [p.detach() for p in self.params]
        diff = torch._foreach_sub(ps, self.anchors)
        weighted = torch._foreach_mul(diff, self.weights)
        torch._foreach_mul_(diff, weighted)
        torch.stack(torch._foreach_norm(diff, 1)).sum()
        torch._foreach_add_(self._grads(), weighted, alpha=2.0)

    @torch.no_grad()
    def si_path_integral(self) -> None:
        """The task loss's gradient (total minus the known penalty gradient), theta before the step,
        and after it ``omega -= g * (theta_after - theta_before)``."""
        ps = [p.detach() for p in self.params]
        g = torch._foreach_add(self._grads(), self.weighted, alpha=-2.0)
        before = torch._foreach_mul(ps, 1.0)
        delta = torch._foreach_sub(ps, before)
        torch._foreach_addcmul_(self.omega, g, delta, value=-1.0)

    @torch.no_grad()
    def packnet_masks(self) -> None:
        """Zero frozen elements' gradients; after the step put frozen weights back (AdamW moves them)."""
        torch._foreach_mul_(self._grads(), self.free)
        ps = [p.detach() for p in self.params]
        torch._foreach_mul_(ps, self.free)
        torch._foreach_add_(ps, self.frozen_values)

    # ---- extra forwards (LwF, DER++, MIR, GEM / A-GEM) -------------------------------------------------

    def teacher_forward(self) -> None:
        with torch.inference_mode():
            self.teacher.compute_outputs(dict(self.batch))

    def _chunk_loss(self, rows: int) -> None:
        """An L2 on ``rows`` rows of the student's chunk, backward: on the chunk the training forward
        already computed, or where it computes none (flow VLAs) through the student's own
        ``compute_outputs`` forward on those rows, as LwF and DER++ then do."""
        if self.step_gives_chunk:
            pred = self.batch["action"][:rows].detach().float().clone().requires_grad_(True)
        else:
            pred = self.policy.compute_outputs(_rows(self.batch, rows))["action_pred"]
        pred.square().mean().backward()

    def distill_loss(self) -> None:
        """The L2 between the student's chunk and the teacher's, on the batch."""
        self._chunk_loss(len(self.batch["action"]))

    def replay_loss_terms(self) -> None:
        """DER++'s output-matching and reweighted losses on the replayed rows (two small L2 terms on
        one chunk of theirs)."""
        if self.step_gives_chunk:
            self._chunk_loss(self.replayed)
            self._chunk_loss(self.replayed)
        else:  # one forward for both terms, as DER++ does
            self._chunk_loss(self.replayed)

    # ---- reading the frames a method needs beyond the training batch -------------------------------

    def read_memory_batch(self) -> None:
        self.batch_of(self.memory_batch)

    def read_candidates(self) -> None:
        self.batch_of(self.num_candidates)

    @torch.no_grad()
    def virtual_step(self) -> None:
        self._virtual = torch._foreach_add([p.detach() for p in self.params], self._grads(), alpha=-1e-4)

    @torch.no_grad()
    def score_candidates(self) -> None:
        """Candidates' losses at theta and at the virtual theta (eval mode, no grad)."""
        if not hasattr(self, "_virtual"):
            self.virtual_step()
        names = [n for n, p in self.policy.named_parameters() if p.requires_grad]
        virtual = dict(zip(names, self._virtual, strict=True))
        self.policy.eval()
        try:
            _loss(self.policy, self.candidates)
            out = functional_call(self.policy, virtual, (dict(self.candidates),), strict=False)
            (out[0] if isinstance(out, tuple) else out).mean()
        finally:
            self.policy.train()

    def retrieved_fwd_bwd(self) -> None:
        """The top ``k``'s loss, differentiated and added to ``.grad``."""
        grads = torch.autograd.grad(_loss(self.policy, _rows(self.candidates, self.k)), self.params)
        torch._foreach_add_(self._grads(), list(grads))

    def memory_fwd_bwd(self) -> None:
        """The reference gradient on a memory batch, flattened (``.grad`` left as it is)."""
        grads = torch.autograd.grad(_loss(self.policy, self.memory), self.params, allow_unused=True)
        self._g_ref = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(self.params, grads, strict=True)
            ]
        )

    @torch.no_grad()
    def projection(self) -> None:
        """``g <- g - (g.g_ref / g_ref.g_ref) g_ref``, always applied (the worst case), written back."""
        if not hasattr(self, "_g_ref"):
            self.memory_fwd_bwd()
        g = torch.cat([gr.reshape(-1) for gr in self._grads()])
        g_ref = self._g_ref
        g = g - (torch.dot(g, g_ref) / torch.dot(g_ref, g_ref)) * g_ref
        parts = torch.split(g, [p.numel() for p in self.params])
        torch._foreach_copy_(self._grads(), [v.view_as(p) for v, p in zip(parts, self.params, strict=True)])

    # ---- all of them ---------------------------------------------------------------------------------

    def callables(self) -> dict[str, Callable[[], None]]:
        """Every primitive by name (``step`` first); LwF's teacher only when the policy can distill."""
        names = [
            "step",
            "penalty",
            "si_path_integral",
            "packnet_masks",
            "distill_loss",
            "replay_loss_terms",
            "virtual_step",
            "score_candidates",
            "retrieved_fwd_bwd",
            "memory_fwd_bwd",
            "projection",
            "read_memory_batch",
            "read_candidates",
        ]
        if callable(getattr(self.teacher, "compute_outputs", None)):
            names.append("teacher_forward")
        if self.lora is not None:
            names.append("lora_step")
        return {n: getattr(self, n) for n in names}


def measure_primitives(
    primitives: Primitives, reps: int = 20, names: tuple[str, ...] | None = None
) -> dict[str, float]:
    """Median seconds per call of every primitive (or only ``names``), interleaved (see
    :func:`time_interleaved`)."""
    device = primitives.params[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    fns = primitives.callables()
    if names is not None:
        fns = {n: fns[n] for n in names}
    return time_interleaved(fns, reps, sync=sync)


__all__ = ["EXTRA_WORK", "ExtraWork", "Primitives", "extra_seconds", "measure_primitives", "time_interleaved"]
