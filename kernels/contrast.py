"""Pixel-to-memory-bank contrast (spec/methods.md 5a): the U2PL sampled loss in Triton.

``sampled_contrast``: program (k, block of anchors) gathers its BLOCK_M anchor rows (by
``anchor_idx``) once, then streams the prototype and the Nneg sampled bank rows of each anchor,
keeping an online log-sum-exp of the cosine logits; nothing of size M x (1 + Nneg) x D is ever
materialised (the official code builds a [256, 51, 256] tensor per class). Each program writes one
partial sum; the launcher adds them in a fixed order (deterministic forward).

``sampled_contrast_backward``: the same stream twice per program (log-sum-exp first, then the
gradient sum_n (softmax_n - [n = 0]) (k_n / (|a| |k_n|) - cos_n a / |a|^2)), scaled by
grad / (M tau) for active rows, written as one fp32 row per sample [K M, D] (5.5 MB at U2PL's
21 x 256 x 256) and summed into d_anchors by ``index_put_(accumulate=True)``: a pixel drawn
several times gets the sum, bit-reproducibly when ``torch.use_deterministic_algorithms`` is on. Cosines clamp each norm at eps = 1e-8 as
``torch.cosine_similarity``; the closed-form gradient is exact while no norm is that small.

``class_bank_contrast`` (CTT HC / LC): program = a block of anchors against the whole bank
[C * Q, D], streamed in column tiles through ``tl.dot`` (fp32, IEEE precision: the logits are
cosines / 0.1 fed to exp, where TF32 rounding would show), never materialising the N x CQ logits
the official code keeps three copies of. Pass 1 sums NEG_p = sum of e^{s/t} over the valid entries
of the other classes; pass 2 the per-anchor loss (HC: over the Q positives of its class; LC: its one
explicit positive). The backward adds pass 3, which accumulates sum_j coef_j g_j with a second
``tl.dot`` (coef = dl/ds_j from the closed form of ops/contrast.py). Exp without max-subtraction as
the official code (|s|/t <= 10). The per-class means are a few [C]-sized scatter ops in the
launcher, on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_M = 16
_EPS = 1e-8


@triton.jit
def _unit_cos(a, a_norm, key_ptr, offs_d, d_ok, row_ok, D, eps):
    """Cosine of anchors a [BLOCK_M, BLOCK_D] with gathered key rows; returns (cos, key, |key|)."""
    key = tl.load(key_ptr + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k_norm = tl.maximum(tl.sqrt(tl.sum(key * key, axis=1)), eps)
    cos = tl.sum(a * key, axis=1) / (a_norm * k_norm)
    return cos, key, k_norm


@triton.jit
def _sampled_kernel(a_ptr, pos_ptr, bank_ptr, aidx_ptr, nidx_ptr, active_ptr, out_ptr, dgrad_ptr, scale_ptr,
                    M, NNEG, D, inv_t, eps,
                    BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    k = tl.program_id(0)
    blk = tl.program_id(1)
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    active = tl.load(active_ptr + k) != 0
    rows = tl.load(aidx_ptr + k.to(tl.int64) * M + offs_m, mask=m_ok, other=0)
    a = tl.load(a_ptr + rows[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    a_norm = tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), eps)

    # positive (column 0): the class prototype, the same row for every anchor of the block
    pos_rows = tl.zeros([BLOCK_M], dtype=tl.int64) + k
    l0, _, _ = _unit_cos(a, a_norm, pos_ptr + pos_rows[:, None] * D, offs_d, d_ok, m_ok, D, eps)
    l0 = l0 * inv_t
    run_max = l0
    run_sum = tl.full([BLOCK_M], 1.0, tl.float32)
    nidx_base = nidx_ptr + (k.to(tl.int64) * M + offs_m) * NNEG
    for n in range(NNEG):
        r = tl.load(nidx_base + n, mask=m_ok, other=0)
        c, _, _ = _unit_cos(a, a_norm, bank_ptr + r[:, None] * D, offs_d, d_ok, m_ok, D, eps)
        logit = c * inv_t
        new_max = tl.maximum(run_max, logit)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(logit - new_max)
        run_max = new_max
    lse = run_max + tl.log(run_sum)

    if not BACKWARD:
        loss = tl.where(m_ok & active, lse - l0, 0.0)
        tl.store(out_ptr + k * tl.num_programs(1) + blk, tl.sum(loss, axis=0))
    else:
        scale = tl.load(scale_ptr) * inv_t / M
        # d loss_m / d a_m = tau^-1 sum_n w_n (k_n / (|a| |k_n|) - cos_n a / |a|^2), w = softmax - onehot
        c0, key0, kn0 = _unit_cos(a, a_norm, pos_ptr + pos_rows[:, None] * D, offs_d, d_ok, m_ok, D, eps)
        w0 = tl.exp(c0 * inv_t - lse) - 1.0
        grad = w0[:, None] * (key0 / (a_norm * kn0)[:, None] - (c0 / (a_norm * a_norm))[:, None] * a)
        for n in range(NNEG):
            r = tl.load(nidx_base + n, mask=m_ok, other=0)
            c, key, kn = _unit_cos(a, a_norm, bank_ptr + r[:, None] * D, offs_d, d_ok, m_ok, D, eps)
            w = tl.exp(c * inv_t - lse)
            grad += w[:, None] * (key / (a_norm * kn)[:, None] - (c / (a_norm * a_norm))[:, None] * a)
        # one row per sample (inactive rows write zeros: a multiplier, not a mask, since a scalar in
        # the mask trips the interpreter); the launcher sums duplicates
        grad = grad * tl.where(active, scale, 0.0)
        sample = (k.to(tl.int64) * M + offs_m)[:, None] * D
        tl.store(dgrad_ptr + sample + offs_d[None, :], grad, mask=m_ok[:, None] & d_ok[None, :])


def _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward, grad=None):
    k, m = anchor_idx.shape
    d = anchors.shape[1]
    nneg = neg_idx.shape[2]
    device = anchors.device
    act = (torch.ones(k, dtype=torch.bool, device=device) if active is None else active).view(torch.uint8)
    blocks = triton.cdiv(m, _BLOCK_M)
    partial = torch.zeros((k, blocks), dtype=torch.float32, device=device)
    dgrad = torch.empty((k * m, anchors.shape[1]), dtype=torch.float32, device=device) if backward else partial
    scale = grad.float().reshape(1) if backward else partial
    if k and m:
        _sampled_kernel[(k, blocks)](anchors, keys_pos, bank if bank.numel() else keys_pos, anchor_idx,
                                     neg_idx, act, partial, dgrad, scale, m, nneg, d, 1.0 / float(temperature),
                                     _EPS, BACKWARD=backward, BLOCK_M=_BLOCK_M,
                                     BLOCK_D=triton.next_power_of_2(d))
    if backward:
        # duplicates add up through index_put_(accumulate=True): deterministic under
        # torch.use_deterministic_algorithms (sort-based), atomics otherwise
        out = torch.zeros(anchors.shape, dtype=torch.float32, device=device)
        out.index_put_((anchor_idx.reshape(-1),), dgrad, accumulate=True)
        return out.to(anchors.dtype)
    return (partial.sum(dim=1) / max(m, 1)).sum().to(anchors.dtype)


def sampled_contrast(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active):
    return _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward=False)


def sampled_contrast_backward(grad, anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active):
    return _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward=True, grad=grad)


# -- CTT dense class-bank contrast ----------------------------------------------------------------

_BLOCK_P = 16
_BLOCK_N = 32


@triton.jit
def _bank_tile(zh, g_ptr, gcls_ptr, gok_ptr, start, offs_d, d_ok, NCOL, D, BLOCK_N: tl.constexpr):
    """Cosines of the anchor block with bank columns [start, start + BLOCK_N), with the columns'
    classes and validity; returns (sim [P, N], g [N, D], class [N], valid [N])."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NCOL
    g = tl.load(g_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                other=0.0)
    gcls = tl.load(gcls_ptr + offs_n, mask=n_ok, other=-2)
    gok = (tl.load(gok_ptr + offs_n, mask=n_ok, other=0) != 0) & n_ok
    return tl.dot(zh, tl.trans(g), input_precision="ieee"), g, gcls, gok


@triton.jit
def _bank_kernel(z_ptr, zn_ptr, lab_ptr, pos_ptr, g_ptr, gcls_ptr, gok_ptr, scale_ptr, loss_ptr, dz_ptr, dp_ptr,
                 N, NCOL, D, inv_t, eps,
                 LC: tl.constexpr, BACKWARD: tl.constexpr, POS_GRAD: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < N
    d_ok = offs_d < D
    lab = tl.load(lab_ptr + offs_p, mask=p_ok, other=-1)
    anchor = p_ok & (lab >= 0)
    zrow = offs_p.to(tl.int64)[:, None] * D + offs_d[None, :]
    zh = tl.load(z_ptr + zrow, mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # unit anchors

    # pass 1: NEG_p over the valid entries of the other classes
    neg = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, NCOL, BLOCK_N):
        sim, _, gcls, gok = _bank_tile(zh, g_ptr, gcls_ptr, gok_ptr, start, offs_d, d_ok, NCOL, D, BLOCK_N)
        x = tl.exp(sim * inv_t)
        is_neg = gok[None, :] & (gcls[None, :] != lab[:, None])
        neg += tl.sum(tl.where(is_neg, x, 0.0), axis=1)

    # pass 2: the loss of each anchor (HC: its class's positives; LC: its explicit positive)
    loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_P], dtype=tl.float32)  # HC: W_p = sum_k w_k x_k
    if LC:
        ph = tl.load(pos_ptr + zrow, mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        s_pos = tl.sum(zh * ph, axis=1)
        x_pos = tl.exp(s_pos * inv_t)
        den = x_pos + neg + eps
        r = x_pos / den
        loss = -tl.log(r + eps)
        w_pos = 1.0 / ((r + eps) * den * den)
    else:
        for start in range(0, NCOL, BLOCK_N):
            sim, _, gcls, gok = _bank_tile(zh, g_ptr, gcls_ptr, gok_ptr, start, offs_d, d_ok, NCOL, D, BLOCK_N)
            x = tl.exp(sim * inv_t)
            is_pos = gok[None, :] & (gcls[None, :] == lab[:, None])
            den = x + neg[:, None] + eps
            r = x / den
            loss += tl.sum(tl.where(is_pos, -tl.log(r + eps), 0.0), axis=1)
            wsum += tl.sum(tl.where(is_pos, x / ((r + eps) * den * den), 0.0), axis=1)

    if not BACKWARD:
        tl.store(loss_ptr + offs_p, tl.where(anchor, loss, 0.0), mask=p_ok)
    else:
        scale = tl.where(anchor, tl.load(scale_ptr + offs_p, mask=p_ok, other=0.0), 0.0)
        if LC:
            wsum = w_pos * x_pos
        # pass 3: A = sum_j coef_j g_j and B = sum_j coef_j s_j over all columns
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for start in range(0, NCOL, BLOCK_N):
            sim, g, gcls, gok = _bank_tile(zh, g_ptr, gcls_ptr, gok_ptr, start, offs_d, d_ok, NCOL, D, BLOCK_N)
            x = tl.exp(sim * inv_t)
            same = gcls[None, :] == lab[:, None]
            coef = tl.where(gok[None, :] & ~same, wsum[:, None] * x * inv_t, 0.0)
            if not LC:
                den = x + neg[:, None] + eps
                r = x / den
                w = 1.0 / ((r + eps) * den * den)
                coef += tl.where(gok[None, :] & same, -w * (neg[:, None] + eps) * x * inv_t, 0.0)
            acc += tl.dot(coef, g, input_precision="ieee")
            b_acc += tl.sum(coef * sim, axis=1)
        zn = tl.load(zn_ptr + offs_p, mask=p_ok, other=1.0)
        dz = (acc - b_acc[:, None] * zh) / zn[:, None]
        if LC:
            c_pos = -w_pos * (neg + eps) * x_pos * inv_t
            dz += (c_pos[:, None] * (ph - s_pos[:, None] * zh)) / zn[:, None]
            if POS_GRAD:
                pn = tl.load(zn_ptr + N + offs_p, mask=p_ok, other=1.0)
                dp = (c_pos[:, None] * (zh - s_pos[:, None] * ph)) / pn[:, None]
                tl.store(dp_ptr + zrow, dp * scale[:, None], mask=p_ok[:, None] & d_ok[None, :])
        tl.store(dz_ptr + zrow, dz * scale[:, None], mask=p_ok[:, None] & d_ok[None, :])


def _unit(x):
    norm = x.float().norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x.float() / norm, 0.0), norm.squeeze(-1)


def _bank_launch(z, labels, bank, positive, fill, mode, temperature, eps, grad=None, positive_grad=False):
    n, d = z.shape
    c, q = bank.shape[:2]
    device = z.device
    lc = mode == "lc"
    zh, zn = _unit(z)
    g, _ = _unit(bank.reshape(c * q, d))
    gcls = torch.arange(c, device=device).repeat_interleave(q)
    counts = torch.full((c,), q, dtype=torch.int64, device=device) if fill is None else fill.long()
    gok = (torch.arange(q, device=device).repeat(c) < counts.repeat_interleave(q)).to(torch.uint8)
    lab = labels.long()
    ph, pn = _unit(positive) if lc else (zh, zn)
    # per-class anchor counts and which classes count in the mean (HC: a non-empty bank too)
    is_anchor = (lab >= 0) & (lab < c)
    per_class = torch.zeros(c + 1, dtype=torch.int64, device=device).index_add_(
        0, torch.where(is_anchor, lab, c), torch.ones_like(lab))[:c]
    counted = (per_class > 0) if lc else (per_class > 0) & (counts > 0)
    n_counted = counted.sum().clamp(min=1).float()
    denom = per_class.float() if lc else per_class.float() * counts.float()
    weight_c = torch.where(counted, 1.0 / (denom.clamp(min=1) * n_counted), 0.0)  # [C]
    weight_p = torch.where(is_anchor, weight_c.index_select(0, lab.clamp(0, c - 1)), 0.0)
    lab32 = torch.where(is_anchor, lab, -1).to(torch.int32)
    backward = grad is not None
    loss = torch.empty(n, dtype=torch.float32, device=device)
    dz = torch.empty((n, d), dtype=torch.float32, device=device) if backward else loss
    dp = torch.empty((n, d), dtype=torch.float32, device=device) if backward and positive_grad else dz
    scale = (weight_p * grad.float()).contiguous() if backward else loss
    norms = torch.cat((zn, pn)).contiguous()
    if n:
        _bank_kernel[(triton.cdiv(n, _BLOCK_P),)](
            zh, norms, lab32, ph, g, gcls, gok, scale, loss, dz, dp, n, c * q, d, 1.0 / float(temperature),
            float(eps), LC=lc, BACKWARD=backward, POS_GRAD=bool(positive_grad), BLOCK_P=_BLOCK_P,
            BLOCK_N=_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)))  # tl.dot needs K >= 16
    if backward:
        out = [dz.to(z.dtype)]
        if positive_grad:
            out.append(dp.to(positive.dtype))
        return out
    if not n:
        return z.new_zeros(())
    return (loss * weight_p).sum().to(z.dtype)


def class_bank_contrast(z, labels, bank, positive, fill, mode, temperature, eps):
    return _bank_launch(z, labels, bank, positive, fill, mode, temperature, eps)


def class_bank_contrast_backward(grad, z, labels, bank, positive, fill, mode, temperature, eps, positive_grad):
    return _bank_launch(z, labels, bank, positive, fill, mode, temperature, eps, grad=grad,
                        positive_grad=positive_grad)


LAUNCHERS = {"sampled_contrast": sampled_contrast, "sampled_contrast_backward": sampled_contrast_backward,
             "class_bank_contrast": class_bank_contrast, "class_bank_contrast_backward": class_bank_contrast_backward}
