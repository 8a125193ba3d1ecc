"""Endless, resumable streams of batch indices.

Each epoch is a fresh permutation drawn from ``(seed, epoch)`` alone, so the stream's whole state
is two integers: resuming needs no saved RNG and yields exactly the batches the run would have seen.
"""
from __future__ import annotations

import torch


class IndexStream:
    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int):
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        if indices.numel() == 0:
            raise ValueError("IndexStream: no indices to draw from")
        if batch_size < 1:
            raise ValueError(f"IndexStream: batch_size must be >= 1, got {batch_size}")
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(self.indices.numel(), generator=g)]

    def next(self) -> torch.Tensor:
        """The next ``batch_size`` indices; a batch may span two epochs (small labeled sets)."""
        return self.next_with_positions()[0]

    def next_with_positions(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``next()`` and, per index, the (epoch, position in the epoch) it was drawn at."""
        parts, where, need = [], [], self.batch_size
        while need:
            if self.position == self._order.numel():
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(need, self._order.numel() - self.position)
            parts.append(self._order[self.position : self.position + take])
            where += [(self.epoch, p) for p in range(self.position, self.position + take)]
            self.position += take
            need -= take
        return torch.cat(parts), where

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)
