"""U2PL entropy, exact percentiles and class-rank masks as custom ops (spec/methods.md 5d).

Ops: ``semiseg::entropy_percentile``, ``semiseg::percentile``, ``semiseg::rank_mask``. All three
are statistics of the teacher and have no gradient: they are custom ops with a fake
registration only (so torch.compile keeps them in the graph), and the Python entries detach
their inputs, so the outputs are constants rather than tensors whose backward would fail.

Semantics are the reference's (numpy-exact linear percentile, stable rank tie rule), with the
cases the reference raises on defined so that a fused kernel never has to look at the data on
the host:

* an empty selection (``valid`` all False, or no element) gives thresholds 0 (U2PL masks every
  use of a threshold with the same ``valid``, so the value only has to be finite);
* NaN among the selected values gives NaN thresholds (numpy's answer).

Precision: ``percentile`` and ``rank_mask`` answer in the dtype of their input; ``percentile``
interpolates bf16/fp16 in float32 and rounds once (numpy would lerp float16 in float16, which
can differ by an ulp). ``entropy_percentile`` returns the entropy and its thresholds in float32
for bf16/fp16 logits (float64 for float64): the thresholds are order statistics of the very
entropy map it returns, so ``H >= T`` selects what the reference selects, and a bf16 entropy
would collapse into ties. This is the dtype U2PL itself computes them in.

Kernel launcher signatures (``LAUNCHERS`` of kernels/entropy_percentile.py), q a list of floats:
``entropy_percentile(logits, q, valid) -> (entropy, thresholds)``,
``percentile(values, q, valid) -> thresholds``, ``rank_mask(prob, low_rank, high_rank) ->
(unlabeled, labeled)``.
"""
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference as ref
from . import _dispatch as d

_PATH = d.HotPath("entropy_percentile")

QLike = int | float | Sequence[float] | Tensor


def _percentiles(values: Tensor, q: Sequence[float], valid: Tensor | None) -> Tensor:
    """Reference percentiles [len(q)] in the dtype of ``values``, empty and NaN cases defined."""
    selected = values.reshape(-1) if valid is None else values[valid]
    if selected.numel() == 0:
        return values.new_zeros(len(q))
    if bool(torch.isnan(selected).any()):
        return values.new_full((len(q),), math.nan)
    return ref.percentile(selected, list(q))


def _reference_entropy_percentile(logits: Tensor, q: Sequence[float],
                                  valid: Tensor | None) -> tuple[Tensor, Tensor]:
    h = ref.entropy(logits.to(d.compute_dtype(logits.dtype)))
    return h, _percentiles(h, q, valid)


def _reference_percentile(values: Tensor, q: Sequence[float], valid: Tensor | None) -> Tensor:
    out = _percentiles(values.to(d.compute_dtype(values.dtype)), q, valid)
    return out.to(values.dtype)


def _reference_rank_mask(prob: Tensor, low_rank: int, high_rank: int) -> tuple[Tensor, Tensor]:
    # Ranks are order only: any dtype ranks exactly, so no upcast.
    return ref.rank_mask(prob, low_rank, high_rank)


@torch.library.custom_op("semiseg::entropy_percentile", mutates_args=())
def _entropy_percentile_op(logits: Tensor, q: list[float], valid: Tensor | None,
                           impl: str) -> tuple[Tensor, Tensor]:
    return _PATH.launch("entropy_percentile", impl, logits.device,
                        _reference_entropy_percentile, logits, q, valid)


@_entropy_percentile_op.register_fake
def _(logits, q, valid, impl):
    b, _, h, w = logits.shape
    dt = d.compute_dtype(logits.dtype)
    return logits.new_empty((b, h, w), dtype=dt), logits.new_empty((len(q),), dtype=dt)


@torch.library.custom_op("semiseg::percentile", mutates_args=())
def _percentile_op(values: Tensor, q: list[float], valid: Tensor | None, impl: str) -> Tensor:
    return _PATH.launch("percentile", impl, values.device, _reference_percentile,
                        values, q, valid)


@_percentile_op.register_fake
def _(values, q, valid, impl):
    return values.new_empty((len(q),))


@torch.library.custom_op("semiseg::rank_mask", mutates_args=())
def _rank_mask_op(prob: Tensor, low_rank: int, high_rank: int,
                  impl: str) -> tuple[Tensor, Tensor]:
    return _PATH.launch("rank_mask", impl, prob.device, _reference_rank_mask,
                        prob, low_rank, high_rank)


@_rank_mask_op.register_fake
def _(prob, low_rank, high_rank, impl):
    return (prob.new_empty(prob.shape, dtype=torch.bool),
            prob.new_empty(prob.shape, dtype=torch.bool))


def _percentages(q: QLike) -> tuple[list[float], bool]:
    """q as Python floats and whether it was a scalar; a tensor q is read on the host."""
    if isinstance(q, (int, float)) and not isinstance(q, bool):
        values, scalar = [float(q)], True
    elif isinstance(q, Tensor):
        if q.dim() > 1 or q.is_complex() or q.dtype == torch.bool:
            raise ValueError(f"q: expected a real scalar or 1-d tensor, got {q.dtype} "
                             f"{tuple(q.shape)}")
        values, scalar = [float(v) for v in q.detach().reshape(-1).tolist()], q.dim() == 0
    elif isinstance(q, (list, tuple)):
        for v in q:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"q: expected numbers, got an element of type {type(v).__name__}")
        values, scalar = [float(v) for v in q], False
    else:
        raise TypeError(f"q: expected a number, a sequence of numbers or a tensor, "
                        f"got {type(q).__name__}")
    if not values:
        raise ValueError("q: expected at least one percentile")
    for v in values:
        if not 0.0 <= v <= 100.0:  # also rejects NaN
            raise ValueError(f"q: percentiles must lie in [0, 100], got {v}")
    return values, scalar


def _check_valid(valid: Tensor | None, ref_name: str, ref_tensor: Tensor,
                 shape: Sequence[int], layout: str) -> None:
    if valid is None:
        return
    d.check_like("valid", valid, ref_name, ref_tensor, dtype=False)
    d.check_dtype("valid", valid, (torch.bool,))
    d.check_shape("valid", valid, shape, layout)


def entropy_percentile(logits: Tensor, q: QLike, valid: Tensor | None = None, *,
                       impl: str | None = None) -> tuple[Tensor, Tensor]:
    """Entropy of the channel softmax and its percentiles over ``valid``, in one call.

    logits [B, C, H, W]; valid bool [B, H, W] (default: every pixel); q one number or a sequence
    of numbers in [0, 100] (U2PL's three thresholds share one selection). Returns
    (entropy [B, H, W], thresholds): thresholds is 0-d for a scalar q, else [len(q)], each equal
    to ``numpy.percentile(entropy[valid], q_i)``. See the module docstring for dtypes and the
    empty case.
    """
    d.check_float("logits", logits, "[B, C, H, W]", 4)
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one class, got {tuple(logits.shape)}")
    b, _, h, w = logits.shape
    _check_valid(valid, "logits", logits, (b, h, w), "[B, H, W]")
    percentages, scalar = _percentages(q)
    mode = _PATH.resolve(impl, "entropy_percentile")
    ent, thresholds = torch.ops.semiseg.entropy_percentile(logits.detach(), percentages,
                                                           valid, mode)
    return ent, thresholds[0] if scalar else thresholds


def percentile(values: Tensor, q: QLike, valid: Tensor | None = None, *,
               impl: str | None = None) -> Tensor:
    """``numpy.percentile`` (linear) of ``values`` over the elements where ``valid`` is True.

    values: any shape; valid: bool of the same shape. q: a number (0-d result) or a sequence
    (result [len(q)]) in [0, 100]. Result in the dtype of ``values``; empty selection gives 0.
    """
    d.check_tensor("values", values)
    if values.dtype not in d.FLOAT_DTYPES:
        raise TypeError(f"values: expected float16, bfloat16, float32 or float64, "
                        f"got {values.dtype}")
    _check_valid(valid, "values", values, values.shape, "the shape of values")
    percentages, scalar = _percentages(q)
    mode = _PATH.resolve(impl, "percentile")
    out = torch.ops.semiseg.percentile(values.detach(), percentages, valid, mode)
    return out[0] if scalar else out


def rank_mask(prob: Tensor, low_rank: int = 3, high_rank: int = 20, *,
              impl: str | None = None) -> tuple[Tensor, Tensor]:
    """U2PL negative-class masks from prob [B, C, H, W]: (unlabeled, labeled), bool [B, C, H, W].

    unlabeled = low_rank <= rank(c) < high_rank, labeled = rank(c) < low_rank, with rank 0 the
    most probable class and ties broken toward the lower class index. ``high_rank`` may exceed C
    (U2PL keeps 20 on 19-class Cityscapes).
    """
    d.check_float("prob", prob, "[B, C, H, W]", 4)
    low_rank = d.check_int("low_rank", low_rank)
    high_rank = d.check_int("high_rank", high_rank)
    if not 0 <= low_rank < high_rank:
        raise ValueError("low_rank, high_rank: expected 0 <= low_rank < high_rank, "
                         f"got {low_rank}, {high_rank}")
    mode = _PATH.resolve(impl, "rank_mask")
    return torch.ops.semiseg.rank_mask(prob.detach(), low_rank, high_rank, mode)


__all__ = ["entropy_percentile", "percentile", "rank_mask"]
