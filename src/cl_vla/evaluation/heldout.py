"""The held-out score of every task, one row of R after each task (``eval=heldout``; with ``eval=sim``
it is kept as a second matrix).

The score of task j is the policy's own training loss (for tiny_vla and ACT: L1 on the normalized
action chunk) averaged over every held-out frame of task j; lower is better. It runs with the
normalization statistics in use, in eval mode, inside a forked RNG so evaluating never changes the
training run's random stream. Under DDP each rank scores a shard and the sums are all-reduced; under
FSDP every rank scores every batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cl_vla.algorithms.base import rank_and_world
from cl_vla.algorithms.sharded import is_sharded
from cl_vla.data.datamodule import ContinualDataModule
from cl_vla.errors import CLVLAError
from cl_vla.training.module import CLPolicyModule


@torch.no_grad()
def evaluate_heldout(
    module: CLPolicyModule,
    dm: ContinualDataModule,
    tasks: Sequence[int],
    *,
    max_batches: int | None = None,
    seed: int = 0,
) -> list[float]:
    rank, world = rank_and_world()
    if is_sharded(module.policy):
        # Every forward of a sharded policy is a collective: each rank scores every batch (same
        # batches, same numbers), so no rank waits in a gather another rank never enters.
        rank, world = 0, 1
    was_training = module.policy.training
    module.policy.eval()
    sums = torch.zeros(len(tasks), 2, dtype=torch.float64)
    found: dict[int, NonFinite] = {}  # per task: where this rank saw non-finite values
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed + 104_729)
        for k, task in enumerate(tasks):
            loader = dm.eval_loader(dm.data.heldout_dataset(task), rank, world)
            with module.algorithm.eval_context(task, module):
                for b, batch in enumerate(loader):
                    if max_batches is not None and b >= max_batches:
                        break
                    n = len(batch["index"])
                    loss, _ = module.compute_loss(batch)
                    if not torch.isfinite(loss):
                        found.setdefault(k, NonFinite()).add(batch, float(loss))
                    sums[k, 0] += float(loss) * n
                    sums[k, 1] += n
    if world > 1:  # a NaN sum reaches every rank, so every rank raises below (no rank waits alone)
        sums = sums.to(module.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    module.policy.train(was_training)
    scores = [float(s / c) if c > 0 else float("nan") for s, c in sums.tolist()]
    for k, task in enumerate(tasks):
        if sums[k, 1] > 0 and not math.isfinite(scores[k]):
            raise NonFiniteEvaluationError(_sentence(dm, task, found.get(k)))
    return scores


class NonFiniteEvaluationError(CLVLAError):
    """A held-out score is NaN or infinite: an error naming the task and its episodes, never a silent
    NaN cell of R (a task with no held-out episode at all is a NaN cell by design: nothing to score)."""


@dataclass
class NonFinite:
    """The held-out episodes of one task whose batches gave a non-finite loss, and the inputs that were
    non-finite in them."""

    loss: float = math.nan
    episodes: set[int] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)

    def add(self, batch: dict, loss: float) -> None:
        self.loss = loss
        episodes = batch.get("episode_index")
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            bad = ~torch.isfinite(value.reshape(len(value), -1)).all(dim=1)
            if bad.any():
                self.keys.add(key)
                if isinstance(episodes, torch.Tensor):
                    self.episodes.update(int(e) for e in episodes[bad].tolist())


def _sentence(dm: ContinualDataModule, task: int, nf: NonFinite | None) -> str:
    where = f"task {task} ({dm.data.task_names[task][:60]!r})"
    if nf is None:  # seen on another rank of a DDP run: that rank names the episodes
        return f"Held-out evaluation of {where} gave a non-finite loss (on another rank); see its error."
    if nf.keys:
        eps = ", ".join(str(e) for e in sorted(nf.episodes)[:10]) or "?"
        return (
            f"Held-out evaluation of {where} gave a loss of {nf.loss}: held-out episode(s) {eps} hold "
            f"non-finite values in {', '.join(sorted(nf.keys))}; repair or remove those episodes."
        )
    return (
        f"Held-out evaluation of {where} gave a loss of {nf.loss} from finite inputs: the policy's "
        "output is not finite (diverged weights?); lower trainer.lr or check the model."
    )
