"""ParallelContext: which tensor-parallel rank this process is, and how to talk to the others.

Created once per worker process and handed to every layer constructor (CPU object; the
process group it may hold lives with torch.distributed). With tp_size == 1 no process group
exists and every collective is the identity, so single-device code pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the tensor-parallel group."""

    tp_rank: int = 0
    tp_size: int = 1
    group: object | None = None
    """torch.distributed ProcessGroup when tp_size > 1, else None."""

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")
        if self.tp_size > 1 and self.group is None:
            raise ValueError("a process group is needed when tp_size > 1")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group in place (identity for one rank)."""
        if self.tp_size == 1:
            return x
        torch.distributed.all_reduce(x, group=self.group)  # type: ignore[arg-type]
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along dim (identity for one rank)."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, x, group=self.group)  # type: ignore[arg-type]
        return torch.cat(parts, dim=dim)

    def shard(self, size: int, what: str) -> int:
        """This rank's share of a dimension of `size`, which must divide evenly."""
        if size % self.tp_size:
            raise ValueError(f"{what}={size} is not divisible by tp_size={self.tp_size}")
        return size // self.tp_size


SINGLE = ParallelContext()
"""The context of a single-device run."""
