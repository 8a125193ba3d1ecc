"""Pixel-to-memory-bank contrastive losses (spec/methods.md 5a), the executable specification.

Two families:

* ``sampled_contrast``: U2PL's loss on explicitly sampled anchors and negatives. Sampling is the
  caller's (DESIGN: the loss takes index tensors), so U2PL's quirk Q1 (anchors and prototype of
  class i, negatives of class V[i]) is simply a choice of which rows the caller stacks.
* ``class_bank_contrast_hc`` / ``class_bank_contrast_lc``: CTT's dense losses of every anchor
  against whole per-class banks, computed literally as the official ``contr_self_loss`` and
  ``contr_net_loss``: cosine as (z @ G^T) / (|z| |G|^T), exp without max-subtraction (|s|/t <= 10
  at t = 0.1, fine in fp32; fp16 sums overflow exactly as the official code would) and
  l = -log(e^s / (e^s + NEG + eps) + eps).

Banks, prototypes and (by default) LC positives are stop-gradient; gradients reach the anchors
only. References loop over classes and use boolean indexing; they compute in the given dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Number = int | float | Tensor


# ----------------------------------------------------------------------------------------------
# U2PL: sampled anchors, prototype positive, sampled negatives
# ----------------------------------------------------------------------------------------------

def _check_sampled(anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor,
                   neg_idx: Tensor, temperature: float, active: Tensor | None) -> None:
    if anchors.dim() != 2 or not anchors.is_floating_point():
        raise ValueError(f"anchors: expected floating [N, D], got {anchors.dtype} "
                         f"{tuple(anchors.shape)}")
    n, d = anchors.shape
    if anchor_idx.dim() != 2 or anchor_idx.dtype != torch.int64:
        raise ValueError(f"anchor_idx: expected int64 [K, M], got {anchor_idx.dtype} "
                         f"{tuple(anchor_idx.shape)}")
    k, m = anchor_idx.shape
    if keys_pos.shape != (k, d):
        raise ValueError(f"keys_pos: expected [K, D] = {(k, d)}, got {tuple(keys_pos.shape)}")
    if bank.dim() != 2 or bank.shape[1] != d:
        raise ValueError(f"bank: expected key rows [R, D] with D={d}, got {tuple(bank.shape)}")
    if neg_idx.dim() != 3 or neg_idx.shape[:2] != (k, m) or neg_idx.dtype != torch.int64:
        raise ValueError(f"neg_idx: expected int64 [K, M, Nneg] with K={k}, M={m}, got "
                         f"{neg_idx.dtype} {tuple(neg_idx.shape)}")
    for name, t in (("keys_pos", keys_pos), ("bank", bank)):
        if t.dtype != anchors.dtype or t.device != anchors.device:
            raise ValueError(f"{name}: expected {anchors.dtype} on {anchors.device}, "
                             f"got {t.dtype} on {t.device}")
    for name, t in (("anchor_idx", anchor_idx), ("neg_idx", neg_idx), ("active", active)):
        if t is not None and t.device != anchors.device:
            raise ValueError(f"{name}: expected device {anchors.device}, got {t.device}")
    if anchor_idx.numel() and not (0 <= int(anchor_idx.min()) and int(anchor_idx.max()) < n):
        raise ValueError(f"anchor_idx: expected indices in [0, {n})")
    if neg_idx.numel() and not (0 <= int(neg_idx.min()) and int(neg_idx.max()) < bank.shape[0]):
        raise ValueError(f"neg_idx: expected row indices in [0, {bank.shape[0]})")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if active is not None and (active.dtype != torch.bool or active.shape != (k,)):
        raise ValueError(f"active: expected bool [K] = [{k}], got {active.dtype} "
                         f"{tuple(active.shape)}")


def _divisor(num_valid: Number | None, k: int) -> float:
    value = float(k if num_valid is None else num_valid)
    if not value > 0:
        raise ValueError(f"num_valid: expected > 0, got {value}")
    return value


def _sampled_keys(keys_pos: Tensor, bank: Tensor, neg_idx: Tensor, row: int) -> Tensor:
    """[M, 1 + Nneg, D]: column 0 the prototype, then the sampled negatives."""
    m = neg_idx.shape[1]
    negatives = bank[neg_idx[row]]
    positive = keys_pos[row].expand(m, 1, -1)
    return torch.cat([positive, negatives], dim=1)


def sampled_contrast(anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor,
                     neg_idx: Tensor, temperature: float = 0.5, *,
                     num_valid: Number | None = None,
                     active: Tensor | None = None) -> Tensor:
    """U2PL contrastive loss over K processed classes (spec 5a).

    ``anchors`` float [N, D]: pixel features (student; the only input that gets a gradient).
    ``keys_pos`` float [K, D] (anchors' dtype): prototype of each processed class. ``bank`` float
    [R, D]: negative key rows (U2PL: every class queue of a ``ClassMemoryBank`` flattened, so a
    row of any class can be drawn for any processed class without copying the bank).
    ``anchor_idx`` int64 [K, M]: sampled rows of ``anchors`` (duplicates allowed, their gradients
    add). ``neg_idx`` int64 [K, M, Nneg]: sampled rows of ``bank`` for processed class k.
    ``active`` bool [K]. Returns a 0-d tensor of anchors' dtype.
    For row k: l_mn = cos(a_m, [proto, negs]_n) / temperature (torch.cosine_similarity, eps 1e-8),
    loss_k = mean_m CE(l_m, target 0). Returns sum_k active_k loss_k / num_valid, where
    ``num_valid`` (|V| in U2PL) defaults to K and ``active`` (default all True) marks rows that
    contribute (U2PL skips a class whose queue is empty: it adds 0 but still counts in |V|).
    """
    _check_sampled(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active)
    k = anchor_idx.shape[0]
    divisor = _divisor(num_valid, k)
    keys_pos, bank = keys_pos.detach(), bank.detach()
    total = anchors[:0].sum()
    for row in range(k):
        if active is not None and not bool(active[row]):
            continue
        a = anchors[anchor_idx[row]]
        keys = _sampled_keys(keys_pos, bank, neg_idx, row)
        logits = torch.cosine_similarity(a.unsqueeze(1), keys, dim=2) / temperature
        total = total + (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    return total / divisor


def sampled_contrast_grad(anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor,
                          neg_idx: Tensor, temperature: float = 0.5, *,
                          num_valid: Number | None = None,
                          active: Tensor | None = None,
                          grad_output: Tensor | None = None) -> Tensor:
    """Closed-form dL/d anchors float [N, D] (anchors' dtype) of :func:`sampled_contrast`, same
    arguments (``anchors`` float [N, D], ``keys_pos`` float [K, D], ``bank`` float [R, D],
    ``anchor_idx`` int64 [K, M], ``neg_idx`` int64 [K, M, Nneg], ``active`` bool [K]) and the
    upstream gradient ``grad_output`` (a 0-d tensor or number, default 1) (spec 5a).

    dL/da_m = (1 / (M num_valid tau)) sum_n (softmax_n - [n = 0])
              * (k_n / (|a| |k_n|) - cos(a, k_n) a / |a|^2),
    scatter-added over duplicate indices. Exact while no norm falls below the cosine eps 1e-8.
    """
    _check_sampled(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active)
    k, m = anchor_idx.shape
    divisor = _divisor(num_valid, k)
    go = 1.0 if grad_output is None else grad_output
    scale = torch.as_tensor(go, dtype=anchors.dtype, device=anchors.device)
    anchors, keys_pos, bank = anchors.detach(), keys_pos.detach(), bank.detach()
    grad = torch.zeros_like(anchors)
    for row in range(k):
        if active is not None and not bool(active[row]):
            continue
        a = anchors[anchor_idx[row]]
        keys = _sampled_keys(keys_pos, bank, neg_idx, row)
        cos = torch.cosine_similarity(a.unsqueeze(1), keys, dim=2)
        weight = torch.softmax(cos / temperature, dim=1)
        weight[:, 0] -= 1
        a_norm = a.norm(dim=1, keepdim=True)
        k_norm = keys.norm(dim=2, keepdim=True)
        radial = cos.unsqueeze(2) * (a / a_norm**2).unsqueeze(1)
        dcos = keys / (a_norm.unsqueeze(1) * k_norm) - radial
        ga = (weight.unsqueeze(2) * dcos).sum(dim=1) / (m * divisor * temperature)
        grad.index_add_(0, anchor_idx[row], ga)
    return grad * scale


# ----------------------------------------------------------------------------------------------
# CTT: dense anchors against whole per-class banks
# ----------------------------------------------------------------------------------------------

def _check_dense(z: Tensor, labels: Tensor, bank: Tensor, temperature: float,
                 fill: Tensor | None) -> Tensor:
    """Validate and return ``fill`` as a list-like int64 tensor [C] on the CPU."""
    if z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"z: expected floating [N, D], got {z.dtype} {tuple(z.shape)}")
    if bank.dim() != 3 or bank.shape[2] != z.shape[1]:
        raise ValueError(f"bank: expected [C, Q, D] with D={z.shape[1]}, got {tuple(bank.shape)}")
    if bank.dtype != z.dtype or bank.device != z.device:
        raise ValueError(
            f"bank: expected {z.dtype} on {z.device}, got {bank.dtype} on {bank.device}")
    c, q = bank.shape[:2]
    if labels.shape != (z.shape[0],) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels: expected int64 [N] = [{z.shape[0]}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if labels.device != z.device:
        raise ValueError(f"labels: expected device {z.device}, got {labels.device}")
    if labels.numel() and int(labels.max()) >= c:
        raise ValueError(f"labels: expected values < C = {c} (negative values mark non-anchors)")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if fill is None:
        return torch.full((c,), q, dtype=torch.int64)
    fill = torch.as_tensor(fill).detach().to("cpu", torch.int64)
    if fill.shape != (c,) or int(fill.min()) < 0 or int(fill.max()) > q:
        raise ValueError(
            f"fill: expected [C] = [{c}] entry counts in [0, {q}], got {fill.tolist()}")
    return fill


def _official_cos(x: Tensor, keys: Tensor) -> Tensor:
    """CTT's cosine: (x @ keys^T) / (|x|^T @ |keys|), an outer product of norms by matmul."""
    norms = x.norm(dim=1).unsqueeze(0).T @ keys.norm(dim=1).unsqueeze(0)
    return (x @ keys.T) / norms


def other_classes(bank: Tensor, fill: Tensor | Sequence[int], cls: int) -> Tensor:
    """Filled entries float [R, D] (bank's dtype) of every class but ``cls`` of ``bank`` float
    [C, Q, D], class by class (the official ``memory_bank[j != i]``); ``fill`` int [C] or a list
    gives each class's valid leading entries."""
    rows = [bank[j, : int(fill[j])] for j in range(bank.shape[0]) if j != cls]
    return torch.cat(rows) if rows else bank[0, :0]


def row_cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_p, b_p) float [P] of paired rows ``a``, ``b`` float [P, D] (no eps, as the official
    ``contr_net_loss``)."""
    return torch.sum(a * b, dim=1) / (torch.norm(a, dim=1) * torch.norm(b, dim=1))


def official_ratio(x: Tensor, neg: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(r, D) of the official l = -log(r + eps): r = x / D, D = x + NEG + eps, for positives
    ``x`` = e^{s+/t} float [P, K] or [P] and negatives ``neg`` = NEG float [P, 1] or [P] (r and D
    broadcast to x's shape). The closed-form backward of the ops starts from the same two."""
    denom = x + neg + eps
    return x / denom, denom


def class_bank_contrast_hc(z: Tensor, labels: Tensor, bank: Tensor, temperature: float = 0.1,
                           eps: float = 1e-12, fill: Tensor | None = None) -> Tensor:
    """CTT high-confidence loss (``contr_self_loss``): every anchor against whole class banks.

    ``z`` float [N, D] anchors (unit rows in CTT; the cosine renormalises anyway), ``labels``
    int32 or int64 [N] (values < 0 mark non-anchors), ``bank`` float [C, Q, D] (z's dtype,
    stop-gradient), ``fill`` int [C] = number of valid leading entries per class (default Q: full
    banks). Returns a 0-d tensor of z's dtype. For anchor p of class c and positive k of bank c:
        l_pk = -log(e^{s_pk/t} / (e^{s_pk/t} + NEG_p + eps) + eps),
        NEG_p = sum of e^{s/t} over the valid entries of the other classes.
    L = mean over counted classes of mean over (p, k). A class counts when it has at least one
    anchor and a non-empty positive bank; a class with anchors but fill 0 contributes nothing
    and is left out of the mean. No counted class gives 0 (a zero gradient to z).
    """
    fill = _check_dense(z, labels, bank, temperature, fill)
    bank = bank.detach()
    total, counted = z[:0].sum(), 0
    for cls in range(bank.shape[0]):
        n_pos = int(fill[cls])
        z_c = z[labels == cls]
        if z_c.shape[0] == 0 or n_pos == 0:
            continue
        counted += 1
        keys = torch.cat([bank[cls, :n_pos], other_classes(bank, fill, cls)])
        logits = torch.exp(_official_cos(z_c, keys) / temperature)
        negatives = logits[:, n_pos:].sum(dim=1, keepdim=True)
        ratio, _ = official_ratio(logits[:, :n_pos], negatives, eps)
        loss = -torch.log(ratio + eps)
        total = total + loss.sum() / (n_pos * z_c.shape[0])
    return total / counted if counted else total


def class_bank_contrast_lc(z: Tensor, labels: Tensor, positive: Tensor, bank: Tensor,
                           temperature: float = 0.5, eps: float = 1e-12,
                           detach_positive: bool = True, fill: Tensor | None = None) -> Tensor:
    """CTT low-confidence loss (``contr_net_loss``): one explicit positive per anchor.

    ``z`` float [N, D] anchors, ``labels`` int32 or int64 [N] (values < 0 mark non-anchors),
    ``positive`` float [N, D] (the peer network's feature at the same pixel, stop-gradient unless
    ``detach_positive`` is False), ``bank`` float [C, 2Q, D] = both networks' banks concatenated
    per class (all of z's dtype), ``fill`` int [C] = valid leading entries per class (default
    all; a caller with two partly filled banks compacts them first). Returns a 0-d tensor of z's
    dtype.
        l_p = -log(e^{s+/t} / (e^{s+/t} + NEG_p + eps) + eps), s+ = cos(z_p, positive_p),
        NEG_p = sum of e^{s/t} over the valid entries of the classes other than label_p.
    L = mean over classes with at least one anchor of mean over their anchors; none gives 0.
    """
    fill = _check_dense(z, labels, bank, temperature, fill)
    if positive.shape != z.shape or positive.dtype != z.dtype or positive.device != z.device:
        raise ValueError(f"positive: expected {z.dtype} {tuple(z.shape)} on {z.device}, got "
                         f"{positive.dtype} {tuple(positive.shape)} on {positive.device}")
    bank = bank.detach()
    if detach_positive:
        positive = positive.detach()
    total, counted = z[:0].sum(), 0
    for cls in range(bank.shape[0]):
        chosen = labels == cls
        z_c = z[chosen]
        if z_c.shape[0] == 0:
            continue
        counted += 1
        p_c = positive[chosen]
        negatives = torch.exp(_official_cos(z_c, other_classes(bank, fill, cls)) / temperature)
        negatives = negatives.sum(dim=1)
        ratio, _ = official_ratio(torch.exp(row_cosine(z_c, p_c) / temperature), negatives, eps)
        loss = -torch.log(ratio + eps)
        total = total + loss.sum() / z_c.shape[0]
    return total / counted if counted else total


__all__ = [
    "class_bank_contrast_hc",
    "class_bank_contrast_lc",
    "official_ratio",
    "other_classes",
    "row_cosine",
    "sampled_contrast",
    "sampled_contrast_grad",
]
