"""SGD with a head learning-rate multiplier and the poly schedule used by every seed method."""
from __future__ import annotations

from typing import Iterable

import torch


def poly_factor(step: int, total: int, power: float = 0.9) -> float:
    """``(1 - step/total) ** power``; step counts from 0, so the first step uses the base LR."""
    if total <= 0:
        raise ValueError(f"total iterations must be positive, got {total}")
    return (1.0 - min(step, total) / total) ** power


def build_sgd(
    backbone_params: Iterable[torch.nn.Parameter],
    head_params: Iterable[torch.nn.Parameter],
    lr: float,
    head_lr_mult: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> torch.optim.SGD:
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    groups = [
        {"params": list(backbone_params), "lr": lr, "lr_mult": 1.0},
        {"params": list(head_params), "lr": lr * head_lr_mult, "lr_mult": head_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    # foreach: one multi-tensor kernel per group instead of one per parameter
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_mult", 1.0)
    return base_lr * factor


class FiniteStep:
    """``optimizer.step()`` that leaves the weights, the momentum buffers and ``buffers`` (the
    students' batch-norm statistics, which the forward pass moves) as they were when the loss or
    any gradient is non-finite, without a host sync.

    ``begin()`` before the forward pass copies them; ``step(loss)`` after the backward pass steps
    anyway (deciding would need the host) and puts back every copied tensor where the step was bad:
    ``torch.where`` on a device flag. Momentum buffers are created up front as zeros, which SGD's
    first step turns into exactly ``grad`` (0 * momentum + grad), so a bad first step has something
    to be put back to and a good one is bit-identical to SGD's own start. Gradients whose squared
    norm overflows float32 count as non-finite. Costs one copy of the guarded tensors per step.
    """

    def __init__(self, optimizer: torch.optim.SGD, buffers: Iterable[torch.Tensor] = ()):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            if group.get("momentum", 0) and group.get("dampening", 0) == 0:
                for p in group["params"]:
                    optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))
        self.tensors = [p for g in optimizer.param_groups for p in g["params"]]
        self.tensors += [optimizer.state[p]["momentum_buffer"] for p in self.tensors if "momentum_buffer" in optimizer.state[p]]
        self.tensors += list(buffers)
        self._saved: list[torch.Tensor] | None = None

    @torch.no_grad()
    def begin(self) -> None:
        """Copy the guarded tensors (call before the forward pass)."""
        # a loaded optimizer state replaces the momentum tensors: follow them
        bufs = [self.optimizer.state[p].get("momentum_buffer") for g in self.optimizer.param_groups for p in g["params"]]
        n = sum(len(g["params"]) for g in self.optimizer.param_groups)
        self.tensors[n : n + len(bufs)] = [b for b in bufs if b is not None]
        if self._saved is None or [t.shape for t in self._saved] != [t.shape for t in self.tensors]:
            self._saved = [torch.empty_like(t) for t in self.tensors]
        torch._foreach_copy_(self._saved, self.tensors)

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Step on the gradients now held; returns bool [] on the device: whether the step was kept
        (``loss`` float [] and every gradient finite)."""
        if self._saved is None:
            raise RuntimeError("FiniteStep.step: call begin() before the forward pass")
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = torch.isfinite(loss.detach().float())
        if grads:
            finite = finite & torch.isfinite(torch.stack(torch._foreach_norm(grads)).float()).all()
        self.optimizer.step()
        for t, old in zip(self.tensors, self._saved):
            torch.where(finite, t, old, out=t)
        return finite
