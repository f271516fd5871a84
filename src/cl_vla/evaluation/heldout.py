"""The held-out score of every task, one row of R after each task (``eval=heldout``; with ``eval=sim``
it is kept as a second matrix).

The score of task j is the policy's own training loss (for tiny_vla and ACT: L1 on the normalized
action chunk) averaged over every held-out frame of task j; lower is better. It runs with the
normalization statistics in use, in eval mode, inside a forked RNG so evaluating never changes the
training run's random stream. Under DDP each rank scores a shard and the sums are all-reduced; under
FSDP every rank scores every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from cl_vla.algorithms.base import rank_and_world
from cl_vla.data.datamodule import ContinualDataModule
from cl_vla.training.fsdp import is_sharded
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
                    sums[k, 0] += float(loss) * n
                    sums[k, 1] += n
    if world > 1:
        sums = sums.to(module.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    module.policy.train(was_training)
    return [float(s / c) if c > 0 else float("nan") for s, c in sums.tolist()]
