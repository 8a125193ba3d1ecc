"""Exponential moving average of a student into a teacher, with fused ``torch._foreach`` ops."""
from __future__ import annotations

import torch
from torch import nn


def ema_decay(step: int, max_decay: float = 0.99, start: int = 0) -> float:
    """Mean-teacher ramp ``min(1 - 1/(step - start + 1), max_decay)`` (U2PL, CTT, MLLC).

    It is 0 at ``step == start`` so the teacher starts as an exact copy of the student.
    """
    k = step - start + 1
    if k <= 0:
        return 0.0
    return min(1.0 - 1.0 / k, max_decay)


class EMA:
    """Keeps ``teacher = decay * teacher + (1 - decay) * student`` for parameters and float buffers.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied. The tensor lists are built
    once, so each update is a handful of multi-tensor kernels, with no per-parameter Python work.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        s_params = list(student.parameters())
        t_params = list(teacher.parameters())
        if len(s_params) != len(t_params):
            raise ValueError("EMA: student and teacher have different parameter lists")
        s_bufs = dict(student.named_buffers())
        t_bufs = dict(teacher.named_buffers())
        if s_bufs.keys() != t_bufs.keys():
            raise ValueError("EMA: student and teacher have different buffers")
        self._float = [
            (t, s) for t, s in zip(t_params, s_params)
        ] + [(t_bufs[k], s_bufs[k]) for k in s_bufs if s_bufs[k].is_floating_point()]
        self._copy = [(t_bufs[k], s_bufs[k]) for k in s_bufs if not s_bufs[k].is_floating_point()]
        for t, s in self._float + self._copy:
            if t.shape != s.shape:
                raise ValueError(f"EMA: shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
        for t in t_params:
            t.requires_grad_(False)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        teachers = [t for t, _ in self._float]
        students = [s.detach() for _, s in self._float]
        # lerp(t, s, w) = t + w (s - t) = decay * t + (1 - decay) * s
        torch._foreach_lerp_(teachers, students, 1.0 - decay)
        for t, s in self._copy:
            t.copy_(s)

    @torch.no_grad()
    def copy_(self) -> None:
        """Reset the teacher to the student (U2PL does this during its burn-in epoch)."""
        self.update(0.0)
