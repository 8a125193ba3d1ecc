"""Pixel-to-memory-bank contrast (spec/methods.md 5a): the U2PL sampled loss in Triton.

``sampled_contrast``: program (k, block of anchors) gathers its BLOCK_M anchor rows (by
``anchor_idx``) once, then streams the prototype and the Nneg sampled bank rows of each anchor,
keeping an online log-sum-exp of the cosine logits; nothing of size M x (1 + Nneg) x D is ever
materialised (the official code builds a [256, 51, 256] tensor per class). Each program writes one
partial sum; the launcher adds them in a fixed order (deterministic forward).

``sampled_contrast_backward``: the same stream twice per program (log-sum-exp first, then the
gradient sum_n (softmax_n - [n = 0]) (k_n / (|a| |k_n|) - cos_n a / |a|^2)), scaled by
grad / (M tau) for active rows, and scatter-added into d_anchors with fp32 atomics (a pixel drawn
several times gets the sum; the order of those additions is not fixed, so the backward is
deterministic only up to fp32 rounding). Cosines clamp each norm at eps = 1e-8 as
``torch.cosine_similarity``; the closed-form gradient is exact while no norm is that small.

``class_bank_contrast`` (CTT HC/LC) has no fused kernel yet: it runs its reference.
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
        # inactive rows add zeros (a multiplier, not a mask: a scalar in the mask trips the interpreter)
        grad = grad * tl.where(active, scale, 0.0)
        tl.atomic_add(dgrad_ptr + rows[:, None] * D + offs_d[None, :], grad, mask=m_ok[:, None] & d_ok[None, :])


def _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward, grad=None):
    k, m = anchor_idx.shape
    d = anchors.shape[1]
    nneg = neg_idx.shape[2]
    device = anchors.device
    act = (torch.ones(k, dtype=torch.bool, device=device) if active is None else active).view(torch.uint8)
    blocks = triton.cdiv(m, _BLOCK_M)
    partial = torch.zeros((k, blocks), dtype=torch.float32, device=device)
    dgrad = torch.zeros(anchors.shape, dtype=torch.float32, device=device) if backward else partial
    scale = grad.float().reshape(1) if backward else partial
    if k and m:
        _sampled_kernel[(k, blocks)](anchors, keys_pos, bank if bank.numel() else keys_pos, anchor_idx,
                                     neg_idx, act, partial, dgrad, scale, m, nneg, d, 1.0 / float(temperature),
                                     _EPS, BACKWARD=backward, BLOCK_M=_BLOCK_M,
                                     BLOCK_D=triton.next_power_of_2(d))
    if backward:
        return dgrad.to(anchors.dtype)
    return (partial.sum(dim=1) / max(m, 1)).sum().to(anchors.dtype)


def sampled_contrast(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active):
    return _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward=False)


def sampled_contrast_backward(grad, anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active):
    return _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward=True, grad=grad)


LAUNCHERS = {"sampled_contrast": sampled_contrast, "sampled_contrast_backward": sampled_contrast_backward}
