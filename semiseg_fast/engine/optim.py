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
