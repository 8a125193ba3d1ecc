"""U2PL entropy, exact percentiles and class-rank masks (spec/methods.md 5d), the executable spec.

``percentile`` reproduces ``numpy.percentile(x, q)`` (default "linear" method) bit for bit. For
each q, numpy computes in float64 the virtual index r = (n - 1) * (q / 100), takes the order
statistics a = x_(floor r), b = x_(floor r + 1) and the weight g = r - floor r, and then
interpolates in the dtype of x with its ``_lerp``:

    diff = b - a
    out  = a + diff * g            if g <  0.5
    out  = b - diff * (1 - g)      if g >= 0.5   (1 - g evaluated in float64 first)

where g and 1 - g are rounded to the dtype of x before the multiply (numpy's weak-scalar rule for
a Python-float q). When r >= n - 1 numpy uses the last order statistic for both a and b and
g = r + 1 (its index there is -1); that case is reproduced too, so signed zeros and infinities
come out as numpy's. One caveat: when the values hold both -0.0 and +0.0, numpy's partition and
a sort may order them differently, so a zero result can differ in sign (it still compares equal).

Several q at once give, for each q_i, the result of ``numpy.percentile(x, float(q_i))``: the
scalar-q call U2PL makes. (numpy called with an array q interpolates in float64 instead and
returns float64; that is deliberately not what is reproduced.) q is always taken as float64,
even when given as a lower-precision tensor.

Empty selections and NaN are errors here (the fused op defines its own no-sync behaviour):
NaN among the considered values raises ``ValueError`` naming ``values`` (NaN at positions that
``valid`` excludes is ignored, since those values take no part); no considered value raises
``ValueError`` naming ``valid`` (or ``values`` when no mask is given).

Rank tie rule (``class_rank``/``rank_mask``): a stable descending sort over classes, so among
equal probabilities the lower class index gets the lower (better) rank:
    rank(c) = #{c' : p_c' > p_c} + #{c' < c : p_c' = p_c}.

``teacher_stats`` is everything U2PL reads off one teacher output, written the way U2PL writes it:
the logits up-sampled with ``F.interpolate`` (bilinear, align_corners=True) to the crop, then the
softmax, the official entropy, the max probability and ``argmax`` of the up-sampled logits (the
first maximum), and at the logits' own grid the softmax and ``rank_mask``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

QLike = float | int | Sequence[float] | Tensor


def entropy(logits: Tensor) -> Tensor:
    """-sum_c p_c log(p_c + 1e-10) of the channel softmax (the official formula).

    ``logits`` float [B, C, H, W] (any trailing dims [B, C, ...]) -> [B, H, W] in its dtype.
    """
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits: expected a floating tensor [B, C, ...], got {logits.dtype} "
            f"{tuple(logits.shape)}")
    return _entropy_of(torch.softmax(logits, dim=1))


def _entropy_of(prob: Tensor) -> Tensor:
    return -torch.sum(prob * torch.log(prob + 1e-10), dim=1)


def _as_percentages(q: QLike) -> tuple[list[float], bool]:
    """q as Python floats (float64) and whether it was a scalar."""
    if isinstance(q, numbers.Real):  # Python and numpy scalars
        scalar, values = True, [float(q)]
    else:
        if not isinstance(q, Tensor):
            q = torch.as_tensor(q, dtype=torch.float64)
        if q.dim() > 1:
            raise ValueError(f"q: expected a scalar or a 1-d sequence, got shape {tuple(q.shape)}")
        scalar = q.dim() == 0
        values = [float(v) for v in q.detach().reshape(-1).tolist()]
    for v in values:
        if not 0.0 <= v <= 100.0:  # also rejects NaN
            raise ValueError(f"q: percentiles must lie in [0, 100], got {v}")
    return values, scalar


def percentile(values: Tensor, q: QLike, valid: Tensor | None = None) -> Tensor:
    """numpy-exact linear percentile(s) of ``values`` over the elements where ``valid`` is True.

    ``values`` float of any shape [...], ``valid`` bool of the same shape; ``q`` a number (result
    0-d, []) or a 1-d sequence or tensor (result [len(q)]), in [0, 100]. The result has the dtype
    and device of ``values``.
    """
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise ValueError("values: expected a floating-point tensor")
    percentages, scalar = _as_percentages(q)
    flat = values.reshape(-1)
    if valid is not None:
        if valid.dtype != torch.bool or valid.shape != values.shape:
            raise ValueError(
                f"valid: expected a bool tensor of shape {tuple(values.shape)}, "
                f"got {valid.dtype} {tuple(valid.shape)}")
        if valid.device != values.device:
            raise ValueError(f"valid: expected device {values.device}, got {valid.device}")
        flat = flat[valid.reshape(-1)]
    n = flat.numel()
    if n == 0:
        name = "valid" if valid is not None else "values"
        raise ValueError(f"{name}: no value to take a percentile of (empty selection)")
    if bool(torch.isnan(flat).any()):
        raise ValueError("values: NaN among the values a percentile is taken of")

    ordered = torch.sort(flat).values
    lo_idx, hi_idx, gammas = [], [], []
    for pct in percentages:
        rank = (n - 1) * (pct / 100.0)  # numpy: true_divide(q, 100) then (n - 1) * quantile
        if rank >= n - 1:
            lo_idx.append(n - 1)
            hi_idx.append(n - 1)
            gammas.append(rank - (-1))  # numpy's gamma against its index -1
        else:
            below = math.floor(rank)
            lo_idx.append(below)
            hi_idx.append(below + 1)
            gammas.append(rank - below)

    dev, dt = values.device, values.dtype
    a = ordered[torch.tensor(lo_idx, device=dev)]
    b = ordered[torch.tensor(hi_idx, device=dev)]
    # Rounded from float64 to the value dtype before multiplying, as numpy's weak Python float.
    g = torch.tensor(gammas, dtype=torch.float64).to(dev, dt)
    one_minus_g = torch.tensor([1.0 - x for x in gammas], dtype=torch.float64).to(dev, dt)
    upper = torch.tensor([x >= 0.5 for x in gammas], device=dev)
    diff = b - a
    out = torch.where(upper, b - diff * one_minus_g, a + diff * g)
    return out[0] if scalar else out


def class_rank(prob: Tensor) -> Tensor:
    """Rank of every class in a descending order over dim 1 (0 = most probable).

    ``prob`` float [B, C, ...] -> int64 [B, C, ...]. Ties: stable descending sort, i.e. the lower
    class index ranks first among equals.
    """
    if prob.dim() < 2:
        raise ValueError(f"prob: expected [B, C, ...], got shape {tuple(prob.shape)}")
    order = torch.sort(prob, dim=1, descending=True, stable=True).indices
    shape = [1] * prob.dim()
    shape[1] = prob.shape[1]
    positions = torch.arange(prob.shape[1], device=prob.device).view(shape).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def rank_mask(prob: Tensor, low_rank: int = 3, high_rank: int = 20) -> tuple[Tensor, Tensor]:
    """U2PL negative-class masks from ``prob`` float [B, C, h, w].

    Returns (unlabeled, labeled), each bool [B, C, h, w]:
    unlabeled = low_rank <= rank(c) < high_rank, labeled = rank(c) < low_rank.
    """
    if not 0 <= low_rank <= high_rank:
        raise ValueError(
            "low_rank, high_rank: expected 0 <= low_rank <= high_rank, "
            f"got {low_rank}, {high_rank}")
    rank = class_rank(prob)
    return (rank >= low_rank) & (rank < high_rank), rank < low_rank


TEACHER_STATS = ("entropy", "max_prob", "argmax", "prob", "unlabeled", "labeled")


def teacher_stats(logits: Tensor, size: Sequence[int] | None = None, first_image: int = 0,
                  low_rank: int = 3, high_rank: int = 20,
                  outputs: Sequence[str] = TEACHER_STATS) -> dict[str, Tensor]:
    """U2PL's statistics of teacher ``logits`` float [B, C, h, w], computed in the dtype of ``logits``.

    At the output grid ``size`` = (H, W) (default: the logits' grid), for images
    ``first_image`` .. B - 1 of the up-sampled logits: "entropy", "max_prob" (float), "argmax"
    (int64), each [B - first_image, H, W]. At the logits' grid, for every image: "prob" (the
    softmax) and "unlabeled" / "labeled" (``rank_mask`` of it), [B, C, h, w]. Only the names in
    ``outputs`` are computed and returned.
    """
    if logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating tensor [B, C, h, w], got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    unknown = set(outputs) - set(TEACHER_STATS)
    if unknown:
        raise ValueError(f"outputs: expected names among {TEACHER_STATS}, got {sorted(unknown)}")
    size = tuple(logits.shape[-2:]) if size is None else tuple(size)
    out = {}
    if {"entropy", "max_prob", "argmax"} & set(outputs):
        up = logits[first_image:]
        if up.shape[-2:] != size:
            up = F.interpolate(up, size=size, mode="bilinear", align_corners=True)
        prob_up = torch.softmax(up, dim=1)
        out |= {"entropy": _entropy_of(prob_up), "max_prob": prob_up.amax(dim=1),
                "argmax": up.argmax(dim=1)}
    if {"prob", "unlabeled", "labeled"} & set(outputs):
        prob = torch.softmax(logits, dim=1)
        out["prob"] = prob
        out["unlabeled"], out["labeled"] = rank_mask(prob, low_rank, high_rank)
    return {name: out[name] for name in outputs}
