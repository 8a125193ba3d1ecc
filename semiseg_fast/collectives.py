"""The process-group view every layer may hold: this process's rank, the world size, and the
collectives the methods need (sum, max, gather), all identities in a single process.

Joining a group is the engine's work (``engine.distributed.init_distributed``); methods and data
only receive a ``DistEnv`` and call its collectives, so no method needs an ``if distributed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv"]


def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a host-side sync: for set-up, never inside a step)."""
        if self.enabled:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or ``"max"``) over ranks as a new tensor: differentiable, traceable by
        ``torch.compile``; the identity in a single process.

        ``tensor`` any dtype [...] -> the same dtype and shape.
        """
        if not self.enabled:
            return tensor
        out = _funcol().all_reduce(tensor, op, dist.group.WORLD)
        return out.wait() if hasattr(out, "wait") else out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``all_reduce(tensor, "sum")``: ``tensor`` any dtype [...] -> the same dtype and shape."""
        return self.all_reduce(tensor, "sum")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's ``tensor`` (same shape on all ranks), rank order:
        ``tensor`` any dtype [N, ...] -> the same dtype [world * N, ...].

        For detached data only (bank keys, labels, masks); bool goes through uint8.
        """
        if not self.enabled:
            return tensor
        src = tensor.detach().contiguous()
        wire = src.to(torch.uint8) if src.dtype == torch.bool else src
        parts = [torch.empty_like(wire) for _ in range(self.world)]
        dist.all_gather(parts, wire)
        out = torch.cat(parts)
        return out.bool() if src.dtype == torch.bool else out
