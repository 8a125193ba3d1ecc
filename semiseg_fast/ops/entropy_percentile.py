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

NaN: the fused path never looks at the data on the host, so it cannot raise on NaN by itself.
``check_nan=True`` (``percentile``, ``entropy_percentile``) adds the check the reference makes:
it reads the len(q) thresholds back (one host sync, nothing else) and raises ``ValueError``
naming the argument when any is NaN: a selected value is NaN, or numpy's interpolation met
inf - inf (both neighbours infinite with opposite signs, or equal and the weight 0 * inf), as
numpy's own result would be NaN there. U2PL's step leaves it off; tests and one-off analyses
turn it on.

``teacher_stats`` (op ``semiseg::teacher_stats``) is U2PL's single pass over teacher logits
[B, C, h, w]: entropy, max probability and arg-max at an output grid (H, W), up-sampled in the
kernel (bilinear, align_corners=True) so the full-resolution logits are never stored, and at the
logits' own grid the softmax and both rank bit maps. ``entropy_percentile(..., size=(H, W))`` is
that pass followed by ``percentile``.

Kernel launcher signatures (``LAUNCHERS`` of kernels/entropy_percentile.py), q a list of floats:
``entropy_percentile(logits, q, valid) -> (entropy, thresholds)``,
``percentile(values, q, valid) -> thresholds``, ``rank_mask(prob, low_rank, high_rank) ->
(unlabeled, labeled)``, ``teacher_stats(logits, size, first_image, want_entropy, want_max_prob,
want_argmax, want_prob, want_rank, low_rank, high_rank) -> (entropy, max_prob, argmax, prob,
unlabeled, labeled)`` with a (0,)-shaped tensor for every output not wanted.
"""
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import reference as ref
from . import _dispatch as d

try:
    from ..kernels import entropy_percentile as _kernels
except ImportError as exc:  # no Triton on this platform: the references serve every call
    _kernels = exc
_PATH = d.HotPath("entropy_percentile", _kernels)

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


_GRID_STATS = ("entropy", "max_prob", "argmax")  # at the output grid
_LOGIT_STATS = ("prob", "unlabeled", "labeled")  # at the logits' grid


def _wanted(want_entropy: bool, want_max_prob: bool, want_argmax: bool, want_prob: bool,
            want_rank: bool) -> list[str]:
    flags = (want_entropy, want_max_prob, want_argmax, want_prob, want_rank, want_rank)
    return [name for name, on in zip(_GRID_STATS + _LOGIT_STATS, flags) if on]


def _teacher_stats_shapes(logits: Tensor, size: Sequence[int], first_image: int, wanted: list[str]):
    """(name, shape, dtype) of the six outputs; (0,) for those not wanted."""
    b, c, h, w = logits.shape
    dt = d.compute_dtype(logits.dtype)
    specs = [("entropy", (b - first_image, *size), dt), ("max_prob", (b - first_image, *size), dt),
             ("argmax", (b - first_image, *size), torch.int64), ("prob", (b, c, h, w), dt),
             ("unlabeled", (b, c, h, w), torch.bool), ("labeled", (b, c, h, w), torch.bool)]
    return [(name, shape if name in wanted else (0,), dtype) for name, shape, dtype in specs]


def _reference_teacher_stats(logits: Tensor, size: list[int], first_image: int, want_entropy: bool,
                             want_max_prob: bool, want_argmax: bool, want_prob: bool, want_rank: bool,
                             low_rank: int, high_rank: int) -> tuple[Tensor, ...]:
    wanted = _wanted(want_entropy, want_max_prob, want_argmax, want_prob, want_rank)
    got = ref.teacher_stats(logits.to(d.compute_dtype(logits.dtype)), size, first_image, low_rank,
                            high_rank, outputs=wanted)
    return tuple(got[name] if name in got else logits.new_empty(shape, dtype=dtype)
                 for name, shape, dtype in _teacher_stats_shapes(logits, size, first_image, wanted))


@torch.library.custom_op("semiseg::teacher_stats", mutates_args=())
def _teacher_stats_op(logits: Tensor, size: list[int], first_image: int, want_entropy: bool,
                      want_max_prob: bool, want_argmax: bool, want_prob: bool, want_rank: bool,
                      low_rank: int, high_rank: int, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                          Tensor, Tensor]:
    return _PATH.launch("teacher_stats", impl, logits.device, _reference_teacher_stats, logits, size,
                        first_image, want_entropy, want_max_prob, want_argmax, want_prob, want_rank,
                        low_rank, high_rank)


@_teacher_stats_op.register_fake
def _(logits, size, first_image, want_entropy, want_max_prob, want_argmax, want_prob, want_rank,
      low_rank, high_rank, impl):
    wanted = _wanted(want_entropy, want_max_prob, want_argmax, want_prob, want_rank)
    return tuple(logits.new_empty(shape, dtype=dtype)
                 for _, shape, dtype in _teacher_stats_shapes(logits, size, first_image, wanted))


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


def _is_number(v: object) -> bool:
    # Python and numpy reals (numpy's scalars register with numbers.Real), not bools
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _percentages(q: QLike) -> tuple[list[float], bool]:
    """q as Python floats and whether it was a scalar; a tensor q is read on the host."""
    if _is_number(q):
        values, scalar = [float(q)], True
    elif isinstance(q, Tensor):
        if q.dim() > 1 or q.is_complex() or q.dtype == torch.bool:
            raise ValueError(f"q: expected a real scalar or 1-d tensor, got {q.dtype} "
                             f"{tuple(q.shape)}")
        values, scalar = [float(v) for v in q.detach().reshape(-1).tolist()], q.dim() == 0
    elif isinstance(q, (list, tuple)):
        for v in q:
            if not _is_number(v):
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


def _check_logits(logits: Tensor) -> None:
    d.check_float("logits", logits, "[B, C, H, W]", 4)
    if logits.shape[1] < 1:
        raise ValueError(f"logits: expected at least one class, got {tuple(logits.shape)}")
    if logits.shape[2] < 1 or logits.shape[3] < 1:  # nothing to read or up-sample from
        raise ValueError(f"logits: expected a grid of at least 1 x 1, got {tuple(logits.shape)}")


def _check_size(size: object, logits: Tensor) -> tuple[int, int]:
    """(H, W) of the output grid, default the grid of ``logits``."""
    if size is None:
        return tuple(logits.shape[-2:])
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)):
        raise ValueError(f"size: expected two positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _check_rank_bounds(low_rank: object, high_rank: object) -> tuple[int, int]:
    low_rank = d.check_int("low_rank", low_rank)
    high_rank = d.check_int("high_rank", high_rank)
    if not 0 <= low_rank < high_rank:
        raise ValueError("low_rank, high_rank: expected 0 <= low_rank < high_rank, "
                         f"got {low_rank}, {high_rank}")
    return low_rank, high_rank


def _raise_on_nan(thresholds: Tensor, name: str) -> None:
    """The opt-in NaN check (module docstring): one host read of len(q) values."""
    if bool(torch.isnan(thresholds).any()):
        raise ValueError(f"{name}: a percentile is NaN (NaN among the values, or an interpolation "
                         f"between infinite values)")


class TeacherStats(NamedTuple):
    """Outputs of :func:`teacher_stats`; the ones not asked for are None.

    entropy, max_prob: float32 (float64 for float64 logits) [B - first_image, H, W];
    argmax: int64 [B - first_image, H, W]; prob: like entropy, [B, C, h, w];
    unlabeled, labeled: bool [B, C, h, w] (see :func:`rank_mask`).
    """
    entropy: Tensor | None
    max_prob: Tensor | None
    argmax: Tensor | None
    prob: Tensor | None
    unlabeled: Tensor | None
    labeled: Tensor | None


def teacher_stats(logits: Tensor, size: Sequence[int] | None = None, *, first_image: int = 0,
                  entropy: bool = True, max_prob: bool = True, argmax: bool = True,
                  prob: bool = False, rank: bool = False, low_rank: int = 3, high_rank: int = 20,
                  impl: str | None = None) -> TeacherStats:
    """U2PL's single pass over teacher ``logits`` float [B, C, h, w] (no gradient).

    At the output grid ``size`` = (H, W) (default (h, w)), for images ``first_image`` .. B - 1:
    the logits up-sampled as ``F.interpolate(..., mode="bilinear", align_corners=True)`` would,
    then ``entropy`` (-sum_c p_c log(p_c + 1e-10), the official formula), ``max_prob`` (max_c p_c)
    and ``argmax`` (of the up-sampled logits, the lowest class among equal maxima, as
    torch.argmax). At the logits' grid, for all B images: ``prob`` (the softmax) and, with
    ``rank``, the masks ``unlabeled`` (low_rank <= rank(c) < high_rank) and ``labeled``
    (rank(c) < low_rank) of :func:`rank_mask`. The flags choose the outputs (at least one); the
    fused kernel reads the logits once for all of them and never stores the up-sampled logits.
    Computed in float32 for bf16/fp16/float32 logits (float64 logits: float64, reference); the
    dtypes and shapes of the outputs are listed in :class:`TeacherStats`.
    """
    _check_logits(logits)
    size = _check_size(size, logits)
    first_image = d.check_int("first_image", first_image)
    if not 0 <= first_image <= logits.shape[0]:
        raise ValueError(f"first_image: expected 0 <= first_image <= B = {logits.shape[0]}, "
                         f"got {first_image}")
    flags = [bool(entropy), bool(max_prob), bool(argmax), bool(prob), bool(rank)]
    if not any(flags):
        raise ValueError("entropy, max_prob, argmax, prob, rank: expected at least one output")
    low_rank, high_rank = _check_rank_bounds(low_rank, high_rank)
    mode = _PATH.resolve(impl, "teacher_stats")
    outs = torch.ops.semiseg.teacher_stats(logits.detach(), list(size), first_image, *flags,
                                           low_rank, high_rank, mode)
    wanted = _wanted(*flags)
    return TeacherStats(*(t if name in wanted else None
                          for name, t in zip(_GRID_STATS + _LOGIT_STATS, outs)))


def entropy_percentile(logits: Tensor, q: QLike, valid: Tensor | None = None, *,
                       size: Sequence[int] | None = None, check_nan: bool = False,
                       impl: str | None = None) -> tuple[Tensor, Tensor]:
    """Entropy of the channel softmax and its percentiles over ``valid``, in one call.

    ``logits`` float [B, C, h, w]; ``size`` (H, W), default (h, w): the grid the entropy is taken
    at, the logits up-sampled to it inside the fused pass (bilinear, align_corners=True, see
    :func:`teacher_stats`). ``valid`` bool [B, H, W] (default: every pixel); ``q`` one number or
    a sequence of numbers in [0, 100] (U2PL's three thresholds share one selection). Returns
    (entropy [B, H, W], thresholds): thresholds is 0-d [] for a scalar q, else [len(q)], each
    equal to ``numpy.percentile(entropy[valid], q_i)``; both float32 (float64 for float64 logits).
    See the module docstring for the empty case and ``check_nan``.
    """
    _check_logits(logits)
    b = logits.shape[0]
    out_size = _check_size(size, logits)
    _check_valid(valid, "logits", logits, (b, *out_size), "[B, H, W]")
    percentages, scalar = _percentages(q)
    if out_size != tuple(logits.shape[-2:]):
        ent = teacher_stats(logits, out_size, max_prob=False, argmax=False, impl=impl).entropy
        thresholds = percentile(ent, percentages, valid, impl=impl)
    else:
        mode = _PATH.resolve(impl, "entropy_percentile")
        ent, thresholds = torch.ops.semiseg.entropy_percentile(logits.detach(), percentages,
                                                               valid, mode)
    if check_nan:
        _raise_on_nan(thresholds, "logits")
    return ent, thresholds[0] if scalar else thresholds


def percentile(values: Tensor, q: QLike, valid: Tensor | None = None, *, check_nan: bool = False,
               impl: str | None = None) -> Tensor:
    """``numpy.percentile`` (linear) of ``values`` over the elements where ``valid`` is True.

    ``values`` float of any shape [...]; ``valid`` bool of the same shape. ``q``: a number (0-d
    result, []) or a sequence (result [len(q)]) in [0, 100]. Result in the dtype of ``values``;
    empty selection gives 0; NaN among the selected values gives NaN, or ``ValueError`` with
    ``check_nan=True`` (one host sync).
    """
    d.check_tensor("values", values)
    if values.dtype not in d.FLOAT_DTYPES:
        raise TypeError(f"values: expected float16, bfloat16, float32 or float64, "
                        f"got {values.dtype}")
    _check_valid(valid, "values", values, values.shape, "the shape of values")
    percentages, scalar = _percentages(q)
    mode = _PATH.resolve(impl, "percentile")
    out = torch.ops.semiseg.percentile(values.detach(), percentages, valid, mode)
    if check_nan:
        _raise_on_nan(out, "values")
    return out[0] if scalar else out


def rank_mask(prob: Tensor, low_rank: int = 3, high_rank: int = 20, *,
              impl: str | None = None) -> tuple[Tensor, Tensor]:
    """U2PL negative-class masks from ``prob`` float [B, C, H, W]: (unlabeled, labeled), bool [B, C, H, W].

    unlabeled = low_rank <= rank(c) < high_rank, labeled = rank(c) < low_rank, with rank 0 the
    most probable class and ties broken toward the lower class index. ``high_rank`` may exceed C
    (U2PL keeps 20 on 19-class Cityscapes).
    """
    d.check_float("prob", prob, "[B, C, H, W]", 4)
    low_rank, high_rank = _check_rank_bounds(low_rank, high_rank)
    mode = _PATH.resolve(impl, "rank_mask")
    return torch.ops.semiseg.rank_mask(prob.detach(), low_rank, high_rank, mode)


__all__ = ["TeacherStats", "entropy_percentile", "percentile", "rank_mask", "teacher_stats"]
