"""DER++ (Buzzega et al., 2020): replay that also matches the outputs the policy gave when storing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from cl_vla.algorithms.base import TaskContext
from cl_vla.algorithms.er import ReplayBuffer
from cl_vla.algorithms.lwf import ACTION_IS_PAD, action_chunk, check_nonnegative, masked_distance
from cl_vla.algorithms.replay_memory import check_task_id

INDEX_KEY = "index"


class DERpp(ReplayBuffer):
    """Dark Experience Replay++: a reservoir of references plus the policy's outputs on them.

    The paper's objective, for a current minibatch and buffer samples ``(x', y', z')`` where ``z'`` are
    the logits the network produced when ``x'`` was stored::

        L = E_cur[l(y, f(x))] + alpha * E_buf[||z' - f(x')||^2] + beta * E_buf[l(y', f(x'))]

    How it maps onto cl_vla:

    - **Logits** are the predicted normalized action chunk (``compute_outputs(batch)["action_pred"]``,
      ``(chunk, A)`` per sample); the alpha term is their squared error, averaged over the steps
      ``action_is_pad`` marks valid.
    - **Storage at task end.** Our buffer is filled once per task (reservoir over the finished task, like
      :class:`ReplayBuffer`), so the outputs are recorded then, with the policy in eval mode, by iterating
      the selected references through ``context.make_loader`` and ``context.compute_loss`` (the run's
      decoding and normalization). The paper records them during training; at the task end they are the
      outputs of the model that finished the task, i.e. the best-trained ones. They are kept as tensors
      keyed by the items' ``index`` (the dataset index the batches carry), so they survive a checkpoint.
    - **Replayed items ride in the batch.** The batch sampler mixes ``floor(replay_batch_ratio * B)``
      references into each batch of ``B`` (as ER does), so the policy loss already contains
      ``(1/B) * sum_replayed l``: the beta term with weight 1. :meth:`penalty` finds replayed rows by their
      ``index`` and adds ``(beta - 1)/B * sum_replayed l + alpha/B * sum_replayed ||z' - f(x')||^2``.
      Every replayed sample then carries ``beta`` (CE) and ``alpha`` (MSE) times a current sample's
      per-sample weight ``1/B``, as in the paper with equal current and buffer minibatch sizes (up to
      padding, which the policy's loss averages over all valid steps). Both terms use the same replayed
      samples; the paper draws two buffer minibatches. ``beta=1`` adds no CE correction, ``beta=0`` is DER.
    - Stored outputs are in the normalized action space of the statistics in use at storage time; with
      ``data.normalization=seen_tasks`` the statistics move between tasks and so do the targets' units.

    Args:
        alpha: Weight of the output-matching (MSE) term, >= 0.
        beta: Weight of the standard loss on replayed samples relative to current ones, >= 0.
        buffer_size_per_task: Maximum number of samples stored per task.
        seed: Random seed for reproducibility.
        replay_batch_ratio: Fraction of each batch drawn from the buffer, in (0, 1).
        balanced_sampling: Equal samples per task when replaying instead of uniform.
        store_batch_size: Batch size used to record the outputs at a task end.
    """

    name = "derpp"

    def __init__(
        self,
        alpha: float = 0.2,
        beta: float = 0.5,
        buffer_size_per_task: int = 500,
        seed: int = 42,
        replay_batch_ratio: float = 0.5,
        balanced_sampling: bool = False,
        store_batch_size: int = 64,
    ) -> None:
        super().__init__(buffer_size_per_task, seed, replay_batch_ratio, balanced_sampling)
        self._check_der_hparams(alpha, beta, replay_batch_ratio, store_batch_size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.store_batch_size = int(store_batch_size)
        self._outputs: dict[int, Tensor] = {}  # task -> (n_refs, chunk, A), rows aligned with refs
        self._keys: dict[int, Tensor] = {}  # task -> (n_refs,) the items' ``index`` values
        self._lookup: dict[int, tuple[int, int]] = {}  # index -> (task, row)

    @staticmethod
    def _check_der_hparams(alpha: Any, beta: Any, replay_batch_ratio: Any, store_batch_size: Any) -> None:
        check_nonnegative("alpha", alpha)
        check_nonnegative("beta", beta)
        if float(replay_batch_ratio) <= 0:
            raise ValueError(
                f"replay_batch_ratio must be in (0, 1) for DER++, got {replay_batch_ratio!r}; with 0 no "
                "stored sample is ever replayed."
            )
        if (
            isinstance(store_batch_size, bool)
            or int(store_batch_size) != store_batch_size
            or store_batch_size < 1
        ):
            raise ValueError(f"store_batch_size must be a positive int, got {store_batch_size!r}.")

    # ---- storage --------------------------------------------------------------------------------

    def populate_from_dataset(self, task_id: int, dataset: Any, num_samples: int | None = None) -> None:
        """Reservoir-sample the task's references; outputs recorded for its old references are dropped."""
        super().populate_from_dataset(task_id, dataset, num_samples)
        self._drop_outputs(int(task_id))

    def _drop_outputs(self, task_id: int) -> None:
        self._outputs.pop(task_id, None)
        self._keys.pop(task_id, None)
        self._rebuild_lookup()

    def _rebuild_lookup(self) -> None:
        self._lookup = {}
        for task_id in sorted(self._keys):  # a later task's row wins for an index stored twice
            for row, key in enumerate(self._keys[task_id].tolist()):
                self._lookup[int(key)] = (task_id, row)

    @torch.no_grad()
    def record_outputs(self, task_id: int, context: TaskContext) -> None:
        """Run the policy (eval mode) over ``task_id``'s stored references and keep its action chunks."""
        if context.make_loader is None or context.compute_loss is None or context.module is None:
            raise RuntimeError(
                "DER++ needs context.module, context.make_loader and context.compute_loss at a task end to "
                "record the policy's outputs on the stored samples."
            )
        refs = self.memory.refs(task_id)
        policy = context.module.policy
        loader = context.make_loader(
            self.memory.subset([(task_id, int(r)) for r in refs]),
            batch_size=self.store_batch_size,
            shuffle=False,
        )
        keys: list[Tensor] = []
        preds: list[Tensor] = []
        done = 0
        with eval_mode(policy), forked_rng(policy):
            for raw in loader:
                _, out = context.compute_loss(raw)
                pred = action_chunk(policy, out.get("batch", raw), out).detach().cpu()
                # Batches carry each item's ``index``; items without one are keyed by their reference.
                index = raw.get(INDEX_KEY, refs[done : done + len(pred)])
                keys.append(torch.as_tensor(index).reshape(-1).long().cpu())
                preds.append(pred)
                done += len(pred)
        outputs, key_tensor = torch.cat(preds), torch.cat(keys)
        if len(outputs) != len(refs) or len(key_tensor) != len(refs):
            raise RuntimeError(
                f"recorded {len(outputs)} outputs for {len(refs)} stored references of task {task_id}."
            )
        self._outputs[task_id], self._keys[task_id] = outputs, key_tensor
        self._rebuild_lookup()

    def stored_outputs(self, task_id: int) -> Tensor:
        """The action chunks recorded for ``task_id``'s references, row ``i`` for reference ``i``."""
        return self._outputs[int(task_id)]

    # ---- hooks ----------------------------------------------------------------------------------

    def on_task_end(self, task_id: int, context: TaskContext | None = None) -> None:
        """Reservoir-sample the task's references (as ER does), then record the policy's outputs on them."""
        super().on_task_end(task_id, context)
        if context is not None and context.train_dataset is not None:
            self.record_outputs(check_task_id(task_id), context)

    def penalty(
        self, module: Any, batch: Mapping[str, Any], outputs: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """``alpha``-weighted output matching and the ``beta`` reweighting on the batch's replayed rows."""
        index = batch.get(INDEX_KEY)
        if not self._lookup or index is None or (self.alpha == 0 and self.beta == 1):
            return None
        keys = torch.as_tensor(index).reshape(-1).tolist()
        hits = [(i, self._lookup.get(int(k))) for i, k in enumerate(keys)]
        hits = [(i, tr) for i, tr in hits if tr is not None]
        if not hits:
            return None
        size = len(keys)
        rows = [i for i, _ in hits]
        policy = getattr(module, "policy", module)
        full = outputs.get("action_pred") if outputs is not None else None
        sub = take_rows(batch, rows, size)
        if isinstance(full, Tensor) and full.shape[0] == size:
            pred = full[torch.as_tensor(rows, device=full.device)]
        else:  # only the replayed rows need a (second) forward pass
            pred = action_chunk(policy, sub)
        stored = torch.stack([self._outputs[t][r] for _, (t, r) in hits]).to(pred.device, pred.dtype)
        pad = sub.get(ACTION_IS_PAD)
        total = pred.new_zeros(())
        if self.alpha > 0:
            total = total + self.alpha * masked_distance(pred, stored, pad, "l2").sum() / size
        if self.beta != 1:
            loss_fn = getattr(policy, "action_loss", None)
            if loss_fn is None:
                raise TypeError(
                    f"DER++ with beta != 1 needs policy.action_loss(pred, target, action_is_pad, reduction) "
                    f"to reweight replayed samples; {type(policy).__name__} has none (set beta=1)."
                )
            per_sample = loss_fn(pred, sub["action"], pad, reduction="none")
            total = total + (self.beta - 1.0) * per_sample.sum() / size
        return total

    def sample(self, batch_size: int) -> list[dict]:
        """Stored items (uniform over tasks' samples) with their recorded ``stored_action_pred``."""
        self.memory.require_datasets()
        pairs = self._draw(batch_size, self._rng, balanced=False)
        items = self._fetch(pairs)
        rows = {
            t: {int(r): i for i, r in enumerate(self.memory.refs(t).tolist())} for t in {t for t, _ in pairs}
        }
        out = []
        for item, (t, ref) in zip(items, pairs, strict=True):
            if t in self._outputs:
                item = {**item, "stored_action_pred": self._outputs[t][rows[t][ref]]}
            out.append(item)
        return out

    def clear(self) -> None:
        """Forget every stored task, attached dataset and recorded output."""
        super().clear()
        self._outputs.clear()
        self._keys.clear()
        self._lookup.clear()

    def memory_bytes(self) -> int:
        """References plus recorded outputs and their keys."""
        extra = sum(t.numel() * t.element_size() for t in [*self._outputs.values(), *self._keys.values()])
        return super().memory_bytes() + int(extra)

    # ---- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """ER's snapshot plus alpha, beta and the recorded outputs and keys (CPU tensors)."""
        state = super().state_dict()
        state.update(
            alpha=self.alpha,
            beta=self.beta,
            store_batch_size=self.store_batch_size,
            outputs={str(t): v.clone() for t, v in self._outputs.items()},
            output_keys={str(t): v.clone() for t, v in self._keys.items()},
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore exactly; recorded outputs must match the stored references one to one."""
        self._check_der_hparams(
            state["alpha"], state["beta"], state["replay_batch_ratio"], state["store_batch_size"]
        )
        outputs = {int(t): v for t, v in state.get("outputs", {}).items()}
        keys = {int(t): v for t, v in state.get("output_keys", {}).items()}
        if set(outputs) != set(keys):
            raise ValueError(
                f"DER++ state has outputs for tasks {sorted(outputs)} but keys for {sorted(keys)}."
            )
        sizes = {int(t): len(e["refs"]) for t, e in state.get("tasks", {}).items()}
        for t in outputs:
            if not isinstance(outputs[t], Tensor) or not isinstance(keys[t], Tensor):
                raise ValueError(f"DER++ state's outputs and keys for task {t} must be tensors.")
            if t not in sizes or len(outputs[t]) != sizes[t] or len(keys[t]) != sizes[t]:
                raise ValueError(
                    f"DER++ state holds {len(outputs[t])} outputs for task {t}, "
                    f"which stores {sizes.get(t, 0)} references."
                )
        super().load_state_dict(state)
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        self.store_batch_size = int(state["store_batch_size"])
        self._outputs = {t: v.clone() for t, v in outputs.items()}
        self._keys = {t: v.clone().long() for t, v in keys.items()}
        self._rebuild_lookup()

    def __repr__(self) -> str:
        return (
            f"DERpp(alpha={self.alpha}, beta={self.beta}, buffer_size_per_task={self.buffer_size_per_task}, "
            f"replay_batch_ratio={self.replay_batch_ratio}, "
            f"tasks={ {t: self.get_task_size(t) for t in self.get_task_ids()} })"
        )


def take_rows(batch: Mapping[str, Any], rows: list[int], size: int) -> dict[str, Any]:
    """The sub-batch of ``rows``: tensors and lists whose leading length is the batch size are indexed."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[torch.as_tensor(rows, device=value.device)]
        elif isinstance(value, list | tuple) and len(value) == size:
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


@contextlib.contextmanager
def eval_mode(policy: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, the previous train/eval mode restored on exit."""
    was_training = policy.training
    policy.eval()
    try:
        yield
    finally:
        policy.train(was_training)


@contextlib.contextmanager
def forked_rng(policy: torch.nn.Module, seed: int | None = None) -> Iterator[None]:
    """Run with a private copy of the global RNG (CPU and the policy's GPU), seeded if ``seed`` is given.

    Policies that draw noise in their forward (dropout, diffusion) must not shift the training run's
    random stream for bookkeeping passes: the run should train as it would without them.
    """
    param = next(policy.parameters(), None)
    devices = [param.device.index or 0] if param is not None and param.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            # Only the generators forked above: `torch.manual_seed` also queues a seed for every
            # uninitialised backend (CUDA, XPU, MTIA) with a formatted stack trace each, ~2 ms a call
            # under Lightning's deep stack (MIR seeds twice a step), and would reseed CUDA devices
            # this fork does not restore.
            torch.default_generator.manual_seed(seed)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(seed)
        yield


__all__ = ["DERpp", "eval_mode", "forked_rng", "take_rows"]
