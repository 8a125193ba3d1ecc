"""IPixMatch spatial softmax KL (spec/methods.md 5c), the executable specification.

For one image b with teacher logits p and student logits q, both [C, HW]:

    Omega_b  = {j : max_c softmax_c(p[:, j]) > tau  and  not ignore[j]}
    psi_k(z) = softmax over j in Omega_b of z[k, j] / t
    L_b      = sum_k KL(psi_k(p) || psi_k(q)) / (C ln |Omega_b|)

Choices the paper leaves open (spec section 4 lists them as ours to make):

* An image with |Omega_b| < 2 contributes exactly 0 (and a zero gradient): ln 1 = 0 makes the
  normalisation undefined and an empty set has no distribution at all.
* ``ignore`` (True = excluded, e.g. padded pixels with label 255) removes pixels from Omega_b.
* ``reduction="mean"`` averages over all B images, degenerate ones included (they count as 0).
* Confidence uses the channel softmax of the raw teacher logits (temperature 1), compared with a
  strict ``>`` as in the paper.

The teacher gets no gradient. This is a reference: it loops over images and uses boolean
indexing (host syncs), and it computes in the dtype it is given.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(p: Tensor, q: Tensor, temperature: float, ignore: Tensor | None,
                  reduction: str) -> None:
    if p.dim() != 4:
        raise ValueError(f"p: expected teacher logits [B, C, H, W], got shape {tuple(p.shape)}")
    if q.shape != p.shape:
        raise ValueError(f"q: expected the shape of p {tuple(p.shape)}, got {tuple(q.shape)}")
    if not p.is_floating_point() or q.dtype != p.dtype:
        raise ValueError(f"p, q: expected one floating dtype, got {p.dtype} and {q.dtype}")
    if q.device != p.device:
        raise ValueError(f"q: expected device {p.device}, got {q.device}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if ignore is not None:
        b, _, h, w = p.shape
        if ignore.dtype != torch.bool or ignore.shape != (b, h, w):
            raise ValueError(
                f"ignore: expected a bool tensor of shape {(b, h, w)}, "
                f"got {ignore.dtype} {tuple(ignore.shape)}")
        if ignore.device != p.device:
            raise ValueError(f"ignore: expected device {p.device}, got {ignore.device}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def confident_set(p: Tensor, tau: float = 0.8, ignore: Tensor | None = None) -> Tensor:
    """Omega as a bool mask [B, H*W]: teacher confidence > tau and not ignored."""
    conf = torch.softmax(p.detach(), dim=1).amax(dim=1)
    omega = conf > tau
    if ignore is not None:
        omega = omega & ~ignore
    return omega.flatten(1)


def _reduce(per_image: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def spatial_kl(p: Tensor, q: Tensor, temperature: float = 4.0, tau: float = 0.8,
               ignore: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """IPixMatch loss of student logits ``q`` against teacher logits ``p`` (both [B, C, H, W]).

    Returns a scalar for ``reduction`` "mean" (over images) or "sum", a [B] vector for "none".
    """
    _check_inputs(p, q, temperature, ignore, reduction)
    p = p.detach()
    b, c = p.shape[:2]
    omega = confident_set(p, tau, ignore)
    t = float(temperature)
    losses = []
    for i in range(b):
        sel = omega[i]
        n = int(sel.sum())
        if n < 2:
            # An empty slice keeps the zero attached to q's graph, so backward yields zeros
            # (not None, not NaN even when q holds non-finite values elsewhere).
            losses.append(q[i].flatten()[:0].sum())
            continue
        pk = p[i].reshape(c, -1)[:, sel] / t
        qk = q[i].reshape(c, -1)[:, sel] / t
        lse_p = torch.logsumexp(pk, dim=1)
        lse_q = torch.logsumexp(qk, dim=1)
        pi = torch.exp(pk - lse_p[:, None])
        # Spec 5c form: sum_j pi_j (p_j - q_j)/t - LSE_p + LSE_q (uses sum_j pi_j = 1).
        kl = (pi * (pk - qk)).sum(dim=1) - lse_p + lse_q
        losses.append(kl.sum() / (c * math.log(n)))
    return _reduce(torch.stack(losses), reduction)


def spatial_kl_grad(p: Tensor, q: Tensor, temperature: float = 4.0, tau: float = 0.8,
                    ignore: Tensor | None = None, reduction: str = "mean",
                    grad_output: Tensor | None = None) -> Tensor:
    """Closed-form dL/dq of :func:`spatial_kl` (spec 5c); p receives no gradient.

    dL_b/dq_kj = (softmax_j(q_k/t) - pi_kj) / (t C ln|Omega_b|) for j in Omega_b, else 0.
    ``grad_output`` defaults to 1; it is a scalar for "mean"/"sum" and a [B] vector for "none".
    """
    _check_inputs(p, q, temperature, ignore, reduction)
    p = p.detach()
    q = q.detach()
    b, c = p.shape[:2]
    omega = confident_set(p, tau, ignore)
    t = float(temperature)
    go = 1.0 if grad_output is None else grad_output
    scale = torch.as_tensor(go, dtype=q.dtype, device=q.device).expand(b)
    if reduction == "mean":
        scale = scale / b
    dq = torch.zeros_like(q).reshape(b, c, -1)
    for i in range(b):
        sel = omega[i]
        n = int(sel.sum())
        if n < 2:
            continue
        pk = p[i].reshape(c, -1)[:, sel] / t
        qk = q[i].reshape(c, -1)[:, sel] / t
        g = (torch.softmax(qk, dim=1) - torch.softmax(pk, dim=1)) / (t * c * math.log(n))
        dq[i][:, sel] = g * scale[i]
    return dq.reshape(q.shape)
