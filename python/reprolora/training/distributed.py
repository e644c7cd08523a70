"""Data parallelism on torch.distributed (gloo), launched by torchrun on one machine or several.

Micro-batch i of a step belongs to rank i % world_size. Each rank computes the gradients of its own
micro-batches; all_gather gives every rank every micro-batch's gradient, and every rank adds them in micro-batch
order (step.fold), exactly as a single process adds the gradients it computed itself. So the sum, and every
byte after it, does not depend on how many ranks there are, or whether the count divides the batch.
Every rank keeps a full copy of the adapter and the optimizer, and takes the same step.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from reprolora.core.errors import ReproloraError


class SingleProcess:
    """The world of a plain `reprolora train`: one process owns every micro-batch."""

    rank, size, is_main = 0, 1, True

    def owns(self, micro_batch: int) -> bool:
        return True

    def gather(self, mine: dict[int, torch.Tensor], count: int, length: int) -> list[torch.Tensor]:
        return [mine[i] for i in range(count)]

    def all_strings(self, value: str) -> list[str]:
        return [value]

    def close(self) -> None:
        pass


class ProcessGroup:
    """One rank of a torchrun job: the process group's gloo backend carries the gradients between ranks."""

    def __init__(self) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    def owns(self, micro_batch: int) -> bool:
        return micro_batch % self.size == self.rank

    def gather(self, mine: dict[int, torch.Tensor], count: int, length: int) -> list[torch.Tensor]:
        """Every micro-batch's vector (`length` floats), in micro-batch order, on every rank. Ranks with fewer
        micro-batches than others (the count need not divide) send zero rows that nobody reads."""
        rows = math.ceil(count / self.size)
        send = torch.zeros(rows, length)
        for i, vector in mine.items():
            send[i // self.size] = vector
        received = [torch.empty(rows, length) for _ in range(self.size)]
        self.dist.all_gather(received, send)
        return [received[i % self.size][i // self.size] for i in range(count)]

    def all_strings(self, value: str) -> list[str]:
        """`value` of every rank, in rank order."""
        gathered: list[Any] = [None] * self.size
        self.dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        self.dist.destroy_process_group()


World = SingleProcess | ProcessGroup


def world() -> World:
    """The process group when torchrun launched more than one process, else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess()
    if "MASTER_ADDR" not in os.environ:
        raise ReproloraError("WORLD_SIZE is set but MASTER_ADDR is not: launch data-parallel runs with torchrun")
    return ProcessGroup()


def check_same(world: World, what: str, value: str) -> None:
    """Fail on every rank unless every rank holds the same `value`."""
    values = world.all_strings(value)
    if len(set(values)) > 1:
        listed = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(values))
        raise ReproloraError(f"the ranks disagree on {what} ({listed}); nothing was published")
