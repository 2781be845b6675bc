"""msrun's world: which rank this process is, how many ranks there are, and how ranks on one host share its cores.

msrun starts N workers and tells each its rank (RANK_ID) and N (RANK_SIZE); run alone, a process is rank 0 of 1.
It also starts a scheduler process that runs the same script (MS_ROLE=MS_SCHED, with RANK_ID=0) to serve
`mindspore.communication.init()`: a command must not do a worker's job in it.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List

from .errors import Idefics3Error
from .process import usable_cores


@dataclass(frozen=True)
class World:
    """This process's rank among `size` data-parallel ranks."""

    rank: int = 0
    size: int = 1

    def owns(self, row) -> bool:
        """Whether this rank runs `row` (anything with an `index`): rows are dealt out round robin."""
        return row.index % self.size == self.rank

    def all_reduce(self, tensors: List) -> List:
        """The element-wise sums of `tensors` over all ranks (MindSpore's AllReduce, after
        `communication.init()`); the tensors themselves for a single rank."""
        if self.size == 1:
            return tensors
        return [_all_reduce()(t) for t in tensors]


@functools.lru_cache(maxsize=None)
def _all_reduce():
    from mindspore import ops

    return ops.AllReduce()


def is_msrun_scheduler() -> bool:
    return os.environ.get("MS_ROLE") == "MS_SCHED"


def current_world() -> World:
    """This process's rank and the number of ranks: msrun's RANK_ID / RANK_SIZE, else rank 0 of 1."""
    rank, size = os.environ.get("RANK_ID", "0"), os.environ.get("RANK_SIZE", "1")
    if not (rank.isdigit() and size.isdigit()) or not int(rank) < int(size):
        raise Idefics3Error(f"RANK_ID={rank!r} / RANK_SIZE={size!r} are not a rank and a rank count; launch with "
                            "msrun (which sets them) or unset them")
    return World(int(rank), int(size))


def share_cpu_threads(world: World) -> None:
    """Ranks on one CPU host split its cores instead of each taking all of them: MINDONE_CPU_THREADS (read by
    device.cpu_threads) becomes cores // ranks, unless it is set already."""
    if world.size > 1 and "MINDONE_CPU_THREADS" not in os.environ:
        os.environ["MINDONE_CPU_THREADS"] = str(max(1, usable_cores() // world.size))
