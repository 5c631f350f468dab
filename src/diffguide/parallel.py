"""Work split across processes launched by ``torchrun`` or ``accelerate launch``.

The unit of work is whatever a single process would run as one batch, so every image is made in
the same batch as on one process and the results equal a single-process run. Shares are
contiguous, as accelerate's ``split_between_processes`` makes them (earlier processes take one more
when the work does not divide).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn, Sequence


def launched() -> bool:
    """Whether this process is one of several started by a distributed launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched on several)."""
    return int(os.environ.get("RANK", "0"))


def on_cpu(requested: bool = False) -> bool:
    """Whether processes run on the CPU (gloo): asked for (``--device cpu``,
    ``ACCELERATE_USE_CPU``),
    or no GPU. accelerate itself would otherwise give every CPU process a world of its own, and each
    would silently do all the work."""
    import torch

    return (
        requested
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or not torch.cuda.is_available()
    )


def check_world(processes: int) -> None:
    """Refuse a run whose process group is not the one the launcher started."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if processes != expected:
        raise ValueError(
            f"launched on {expected} processes but accelerate joined {processes}; on a CPU "
            f"machine set ACCELERATE_USE_CPU=1 (docs/distillation.md, 'Several processes')"
        )


def process_state(cpu: bool = False):
    """accelerate's ``PartialState`` (process group, rank, device) when launched on several
    processes, else None. ``cpu`` keeps every process on the CPU (gloo)."""
    if not launched():
        return None
    from accelerate import PartialState

    state = PartialState(cpu=on_cpu(cpu))
    check_world(state.num_processes)
    return state


def rank_and_world(state) -> tuple[int, int]:
    if state is None:
        return 0, 1
    return int(state.process_index), int(state.num_processes)


def is_main(state) -> bool:
    return rank_and_world(state)[0] == 0


def bounds(n: int, state) -> tuple[int, int]:
    """[start, end) of this process's contiguous share of n items."""
    rank, world = rank_and_world(state)
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def shard(items: Sequence, state) -> list:
    """This process's contiguous share of ``items`` (all of them on one process)."""
    start, end = bounds(len(items), state)
    return list(items[start:end])


def gather(items: list, state) -> list:
    """Every process's ``items`` concatenated in rank order, on every process (any picklable
    objects); the list itself on one process."""
    if state is None or rank_and_world(state)[1] == 1:
        return list(items)
    import torch.distributed as dist

    parts: list[Any] = [None] * rank_and_world(state)[1]
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def barrier(state) -> None:
    if state is not None and rank_and_world(state)[1] > 1:
        state.wait_for_everyone()


def end_processes() -> None:
    """Close the process group this process opened, if any: left to interpreter exit, gloo's
    threads sometimes abort a process whose work is done ("terminate called without an active
    exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already torn down by accelerate or a failed peer: nothing left to close
            pass


def exit_launched(code: int = 0) -> NoReturn:
    """End a launched process with ``code`` once its work is written: close its group, flush, and
    leave without the interpreter's teardown, where gloo's threads can still abort the process after
    the group is closed (seen as exit -6 of a run that had finished)."""
    end_processes()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
