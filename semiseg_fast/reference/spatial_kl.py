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

The loss and its gradient are assembled from per-image pieces that the fused op
(``semiseg_fast.ops.spatial_kl``) shares with this module, so that each formula has one home:
:func:`image_statistics` (LSE, KL per class and |Omega_b|, what the fused kernel computes),
:func:`image_weight` (1 / (C ln |Omega_b|)), :func:`image_loss`, :func:`reduce_images`,
:func:`grad_scale` (the per-image factor of the closed-form gradient) and :func:`scaled_grad`.
"""
from __future__ import annotations

import torch
from torch import Tensor

_REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(p: Tensor, q: Tensor, temperature: float, ignore: Tensor | None,
                  reduction: str = "none") -> None:
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
    """Omega: teacher confidence > tau and not ignored.

    ``p`` float [B, C, H, W], ``ignore`` bool [B, H, W] (True = excluded) -> bool [B, H*W].
    """
    conf = torch.softmax(p.detach(), dim=1).amax(dim=1)
    omega = conf > tau
    if ignore is not None:
        omega = omega & ~ignore
    return omega.flatten(1)


def image_statistics(p: Tensor, q: Tensor, temperature: float = 4.0, tau: float = 0.8,
                     ignore: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per image b and class k, over Omega_b: the statistics the loss and its gradient are made of.

    ``p``, ``q`` float [B, C, H, W] (one dtype), ``ignore`` bool [B, H, W]. Returns
    ``lse`` [B, 2, C] (LSE_p and LSE_q: log-sum-exp of p/t and q/t over Omega_b, -inf when Omega_b
    is empty), ``kl`` [B, C] (KL(psi_k(p) || psi_k(q)), 0 when |Omega_b| < 2), both in the dtype
    of ``q``, and ``n`` int64 [B] = |Omega_b|. ``kl`` is differentiable in ``q``.
    """
    _check_inputs(p, q, temperature, ignore)
    p = p.detach()
    b, c = p.shape[:2]
    omega = confident_set(p, tau, ignore)
    n = omega.sum(dim=1)
    t = float(temperature)
    lse, kl = [], []
    for i in range(b):
        sel = omega[i]
        count = int(n[i])
        # An empty slice keeps the zero attached to q's graph, so backward yields zeros
        # (not None, not NaN even when q holds non-finite values elsewhere).
        zero = q[i].flatten()[:0].sum().expand(c)
        if count == 0:
            lse.append(q.new_full((2, c), float("-inf")))
            kl.append(zero)
            continue
        pk = p[i].reshape(c, -1)[:, sel] / t
        qk = q[i].reshape(c, -1)[:, sel] / t
        lse_p = torch.logsumexp(pk, dim=1)
        lse_q = torch.logsumexp(qk, dim=1)
        lse.append(torch.stack((lse_p, lse_q)))
        if count < 2:
            kl.append(zero)
            continue
        pi = torch.exp(pk - lse_p[:, None])
        # Spec 5c form: sum_j pi_j (p_j - q_j)/t - LSE_p + LSE_q (uses sum_j pi_j = 1).
        kl.append((pi * (pk - qk)).sum(dim=1) - lse_p + lse_q)
    return torch.stack(lse), torch.stack(kl), n


def image_weight(n: Tensor, c: int) -> Tensor:
    """1 / (C ln |Omega_b|), 0 when |Omega_b| < 2 (ln 1 = 0 leaves the normalisation undefined).

    ``n`` int64 [B] -> float64 [B]: float64 whatever the data dtype, so every caller rounds the
    same value once to its own dtype.
    """
    n = n.double()
    return torch.where(n >= 2, 1.0 / (c * torch.log(n.clamp(min=2))), 0.0)


def image_loss(kl: Tensor, weight: Tensor) -> Tensor:
    """L_b = weight_b sum_k KL_bk, exactly 0 for images of weight 0.

    ``kl`` float [B, C], ``weight`` float [B] (the dtype of ``kl``) -> [B] in that dtype.
    """
    # degenerate images may hold NaN statistics (0/0 in the fused kernel): select, never multiply
    return torch.where(weight > 0, kl.sum(dim=1) * weight, 0.0)


def reduce_images(per_image: Tensor, reduction: str) -> Tensor:
    """``per_image`` float [B] -> [] for "mean" (over all B images, degenerate ones count as 0)
    and "sum", the [B] tensor itself for "none"."""
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def grad_scale(weight: Tensor, temperature: float, grad_output: Tensor, reduction: str) -> Tensor:
    """Per-image factor s_b of the closed-form gradient (see :func:`scaled_grad`):
    s_b = weight_b / t * g_b, divided by B for "mean".

    ``weight`` float [B]; ``grad_output`` of the same dtype, [] for "mean"/"sum", [B] for "none"
    -> float [B] in that dtype.
    """
    b = weight.shape[0]
    scale = weight / float(temperature) * grad_output.expand(b)
    if reduction == "mean":
        scale = scale / b
    return scale


def scaled_grad(p: Tensor, q: Tensor, temperature: float, tau: float, ignore: Tensor | None,
                scale: Tensor) -> Tensor:
    """dL/dq_kj = s_b (softmax_j(q_k/t) - pi_kj) for j in Omega_b, else 0; p gets no gradient.

    ``p``, ``q`` float [B, C, H, W] (one dtype), ``ignore`` bool [B, H, W], ``scale`` float [B]
    (the dtype of ``q``, from :func:`grad_scale`) -> float [B, C, H, W] in the dtype of ``q``.
    Images with |Omega_b| < 2 get exactly 0, whatever their scale.
    """
    _check_inputs(p, q, temperature, ignore)
    p = p.detach()
    q = q.detach()
    b, c = p.shape[:2]
    omega = confident_set(p, tau, ignore)
    t = float(temperature)
    dq = torch.zeros_like(q).reshape(b, c, -1)
    for i in range(b):
        sel = omega[i]
        if int(sel.sum()) < 2:
            continue
        pk = p[i].reshape(c, -1)[:, sel] / t
        qk = q[i].reshape(c, -1)[:, sel] / t
        dq[i][:, sel] = (torch.softmax(qk, dim=1) - torch.softmax(pk, dim=1)) * scale[i]
    return dq.reshape(q.shape)


def spatial_kl(p: Tensor, q: Tensor, temperature: float = 4.0, tau: float = 0.8,
               ignore: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """IPixMatch loss of student logits ``q`` against teacher logits ``p``.

    ``p``, ``q`` float [B, C, H, W] (one dtype), ``ignore`` bool [B, H, W]. Returns, in the dtype
    of ``q``, a 0-d tensor [] for ``reduction`` "mean" (over images) or "sum", [B] for "none".
    """
    _check_inputs(p, q, temperature, ignore, reduction)
    _, kl, n = image_statistics(p, q, temperature, tau, ignore)
    weight = image_weight(n, p.shape[1]).to(kl.dtype)
    return reduce_images(image_loss(kl, weight), reduction)


def spatial_kl_grad(p: Tensor, q: Tensor, temperature: float = 4.0, tau: float = 0.8,
                    ignore: Tensor | None = None, reduction: str = "mean",
                    grad_output: Tensor | None = None) -> Tensor:
    """Closed-form dL/dq of :func:`spatial_kl` (spec 5c); p receives no gradient.

    dL_b/dq_kj = (softmax_j(q_k/t) - pi_kj) / (t C ln|Omega_b|) for j in Omega_b, else 0.
    ``p``, ``q`` float [B, C, H, W] (one dtype), ``ignore`` bool [B, H, W]; ``grad_output``
    (default 1) float [] for "mean"/"sum", [B] for "none". Returns float [B, C, H, W] in the dtype
    of ``q``.
    """
    _check_inputs(p, q, temperature, ignore, reduction)
    go = 1.0 if grad_output is None else grad_output
    go = torch.as_tensor(go, dtype=q.dtype, device=q.device)
    weight = image_weight(confident_set(p, tau, ignore).sum(dim=1), p.shape[1]).to(q.dtype)
    return scaled_grad(p, q, temperature, tau, ignore, grad_scale(weight, temperature, go, reduction))
