"""Branch parallelism: the rows of one image's guided forward passes split across processes.

A guided step evaluates its branches (cond, uncond, perturbed, ...) as one batched forward over
their concatenated rows. With ``BranchParallel`` and ``torch.distributed`` initialised on W > 1
processes, every process builds the same concatenated batch, runs the network on its own
contiguous share of the rows only (earlier processes take one more where the rows do not divide;
a share may be empty), and the shares' predictions are gathered back in row order, so that every
process continues with the whole batch's predictions, as one process would. Every process must
run the same sampling (same inputs, same guidance); the results equal one process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .pred import Pred


@dataclass(frozen=True, eq=False)
class BranchParallel:
    """Split each guided forward's rows across the processes of ``group`` (None: the default
    process group). Without an initialised process group, or on one process, it does nothing."""

    group: Any = None

    def world(self) -> tuple[int, int]:
        """(rank, world size) in the group; (0, 1) when there is no process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    @staticmethod
    def bounds(n: int, rank: int, world: int) -> tuple[int, int]:
        """[start, stop) of ``rank``'s contiguous share of n rows."""
        per, extra = divmod(n, world)
        start = rank * per + min(rank, extra)
        return start, start + per + (rank < extra)

    def gather(
        self, pred: Pred | None, n: int, like: torch.Tensor, rank: int, world: int, dtype=None
    ) -> Pred:
        """The whole forward's Pred (n rows, in row order) from every process's share (``pred``:
        this process's; None where its share is empty). ``like``: the forward's input x;
        ``dtype``: the output's, where an earlier forward of the run told it."""
        import torch.distributed as dist

        sizes = [b - a for a, b in (self.bounds(n, r, world) for r in range(world))]
        if min(sizes) > 0:
            dtype = pred.x0.dtype
        elif dtype is None:  # a process without rows cannot tell it: take it from one with rows
            dtypes = [None] * world
            dist.all_gather_object(dtypes, None if pred is None else pred.x0.dtype, self.group)
            dtype = next(d for d in dtypes if d is not None)
        # x0 and eps in one buffer of the largest share (the first's), one gather for both
        mine = torch.zeros((2, sizes[0], *like.shape[1:]), dtype=dtype, device=like.device)
        if pred is not None:
            mine[0, : sizes[rank]], mine[1, : sizes[rank]] = pred.x0, pred.eps
        bufs = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(bufs, mine, self.group)
        return Pred(*(torch.cat([b[i, :k] for b, k in zip(bufs, sizes)]) for i in (0, 1)))


def as_parallel(parallel) -> BranchParallel | None:
    """``guide``'s ``parallel``: None/False (off), True or "branches" (the default group), or a
    BranchParallel."""
    if parallel is None or parallel is False:
        return None
    if parallel is True or parallel == "branches":
        return BranchParallel()
    if isinstance(parallel, BranchParallel):
        return parallel
    raise ValueError(
        f"parallel must be None, 'branches' or a BranchParallel, got {type(parallel).__name__}"
    )
