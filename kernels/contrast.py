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
[C * Q, D], streamed in column tiles through ``tl.dot`` on the tensor cores, never materialising
the N x CQ logits the official code keeps three copies of; extra memory is O(N + C Q D). Inputs
go to the dot as given: bf16/fp16 unit rows (fp32 accumulation); fp32 at IEEE or TF32 precision
by ``precision`` (the op turns "auto" into PyTorch's float32 matmul precision before the launch,
see ``resolve_precision``). Anchors are normalised in the kernel and visited in label order (one
device sort), so a block holds one or two classes.
Pass 1 keeps NEG_p = sum of e^{s/t} over the valid entries of the other classes as a running max
m and a rescaled sum (online, as flash attention), so no exp can overflow whatever t is; pass 2
takes the per-anchor loss in the log domain with the official eps terms kept exactly (see
``_positive_terms``): HC over the positives of the block's classes only (~Q columns, not C Q),
LC on the explicit positive. The backward recomputes passes 1-2 and adds pass 3, which
accumulates sum_j coef_j g_j with a second ``tl.dot``; every negative's coefficient is one scalar
per anchor times e^{b_j - m} (spec 5a's closed form), and the bf16/fp16 operand is that divided
by the anchor's largest coefficient, in [0, 1] (what falls below fp16's range is < 6e-8 of the
largest term), where the raw coefficients, all small when the loss is near 0, would flush to zero
together. HC's positives (~Q columns) take their dot in fp32 (TF32/IEEE) in pass 2. The per-class means are a few [C]-sized
scatter ops in the launcher, on the device.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Anchors per program of the sampled loss. Read at every launch: profiling/tune.py sweeps it.
SAMPLED_TILES = {"BLOCK_M": 16}
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
    block_m = SAMPLED_TILES["BLOCK_M"]
    act = (torch.ones(k, dtype=torch.bool, device=device) if active is None else active).view(torch.uint8)
    blocks = triton.cdiv(m, block_m)
    partial = torch.zeros((k, blocks), dtype=torch.float32, device=device)
    dgrad = torch.empty((k * m, anchors.shape[1]), dtype=torch.float32, device=device) if backward else partial
    scale = grad.float().reshape(1) if backward else partial
    if k and m:
        _sampled_kernel[(k, blocks)](anchors, keys_pos, bank if bank.numel() else keys_pos, anchor_idx,
                                     neg_idx, act, partial, dgrad, scale, m, nneg, d, 1.0 / float(temperature),
                                     _EPS, BACKWARD=backward, BLOCK_M=block_m,
                                     BLOCK_D=triton.next_power_of_2(d))
    if backward:
        # duplicates add up through index_put_(accumulate=True): deterministic under
        # torch.use_deterministic_algorithms (sort-based), atomics otherwise
        out = torch.zeros(anchors.shape, dtype=torch.float32, device=device)
        out.index_put_((anchor_idx.reshape(-1),), dgrad, accumulate=True)
        return out.to(anchors.dtype)
    return (partial.sum(dim=1) / max(m, 1)).sum().to(anchors.dtype)


def sampled_contrast(anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor, neg_idx: Tensor,
                     temperature: float, active: Tensor | None) -> Tensor:
    """sum_k active_k mean_m CE(cos(a_m, [proto_k, negs]) / temperature, 0), a 0-d tensor of anchors'
    dtype, of ``anchors`` float [N, D], ``keys_pos`` float [K, D] and ``bank`` float [R, D] (one
    dtype; read in fp32), ``anchor_idx`` int64 [K, M] rows of anchors, ``neg_idx`` int64
    [K, M, Nneg] rows of bank and ``active`` bool [K] (None: all)."""
    return _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward=False)


def sampled_contrast_backward(grad: Tensor, anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor,
                              neg_idx: Tensor, temperature: float, active: Tensor | None) -> Tensor:
    """d_anchors float [N, D] (anchors' dtype) of :func:`sampled_contrast` scaled by ``grad`` float
    0-d, same arguments (``anchors`` float [N, D], ``keys_pos`` float [K, D], ``bank`` float
    [R, D], ``anchor_idx`` int64 [K, M], ``neg_idx`` int64 [K, M, Nneg], ``active`` bool [K] or
    None); anchors drawn several times get the sum."""
    return _launch(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, backward=True, grad=grad)


# -- CTT dense class-bank contrast ----------------------------------------------------------------

# (BLOCK_P anchors, BLOCK_N bank columns, warps, stages) per dot kind ("ieee" / "tf32" fp32, "half"
# bf16/fp16) and direction ("_bwd"). The interpreter pays per program and per op, so it keeps small
# tiles (several blocks even in small tests). On CUDA, 64 anchors spilled (0.4-44 KB per thread)
# in the IEEE forward (FMA units) and in every backward (a [P, D] fp32 accumulator next to the
# anchor rows); these are the largest candidates that compiled without a spill for sm_90 and sm_80
# under Triton 3.6 and 3.9 (profiling.aot, results/aot_sm90.csv; fewer anchors per program read
# each bank tile more often).
BANK_TILES = {"interpret": (16, 32, 4, 1),
              "ieee": (32, 16, 8, 2), "ieee_bwd": (16, 16, 8, 2),
              "tf32": (64, 32, 8, 2), "tf32_bwd": (16, 32, 8, 2),
              "half": (64, 32, 8, 2), "half_bwd": (16, 32, 8, 2)}
PRECISIONS = ("ieee", "tf32")


@triton.jit
def _lse2(x, y):
    """log(e^x + e^y) without overflow; -inf when both are -inf (never NaN)."""
    hi = tl.maximum(x, y)
    safe = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), hi, safe + tl.log(1.0 + tl.exp(tl.minimum(x, y) - safe)))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the interpreter's bf16 tl.dot is wrong (DESIGN.md); bf16 x bf16 products are exact
    # in fp32, so fp32 IEEE operands compute what the tensor cores compute (fp32 accumulation)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _unit_rows(ptr, zrow, zmask):
    """Rows at ``zrow`` in fp32 scaled to unit length (a zero row stays zero), and their norms."""
    x = tl.load(ptr + zrow, mask=zmask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.where(norm > 0, norm, 1.0)[:, None], norm


@triton.jit
def _bank_tile(zd, g_ptr, fill_ptr, start, offs_d, d_ok, NCOL, Q, D,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cosines [P, N] of the anchor block with bank columns [start, start + BLOCK_N) (class-major,
    Q per class), with the tile g [N, D], the columns' classes and their validity (slot < fill)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NCOL
    g = tl.load(g_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                other=0.0)
    gcls = offs_n // Q
    gok = n_ok & (offs_n - gcls * Q < tl.load(fill_ptr + gcls, mask=n_ok, other=0))
    return _dot(zd, tl.trans(g), PRECISION, UPCAST), g, gcls, gok


@triton.jit
def _positive_terms(a, lne, log_eps):
    """Loss and gradient factors of one positive of logit a = s+/t, in the shifted domain.

    Official: r = e^a / (e^a + NEG + eps), l = -log(r + eps). Shifted by the negatives' max m
    (numerator and denominator divided by e^m): r = e^{a-m} / (e^{a-m} + S + eps e^{-m}), the same
    ratio, so the eps inside the ratio becomes eps e^{-m} and the outer eps is untouched (r is
    shift-free). Computed in logs: with lne = log(NEG + eps)
    (NEG = S e^m kept as m + log S, eps entering as log eps), log D = lse(a, lne) is log(e^a + NEG
    + eps) exactly (log-sum-exp subtracts its own max), so log r = a - log D and l = -lse(log r,
    log eps): the same value with no e^a, e^m or eps e^-m ever formed (eps e^-m would underflow
    for a large m; e^a overflows fp32 beyond a = 88.7). Returns (l, r/(r+eps), log D, dl/da) with
    r/(r+eps) = e^{log r + l} and dl/da = -(r/(r+eps)) (1 - r), 1 - r = e^{lne - log D}.
    """
    log_d = _lse2(a, lne)
    log_r = a - log_d
    loss = -_lse2(log_r, log_eps)
    ratio = tl.exp(log_r + loss)
    return loss, ratio, log_d, -ratio * tl.exp(lne - log_d)


@triton.jit
def _bank_kernel(z_ptr, order_ptr, lab_ptr, pos_ptr, g_ptr, fill_ptr, scale_ptr, loss_ptr, dz_ptr, dp_ptr,
                 N, NCOL, Q, D, inv_t, log_eps,
                 LC: tl.constexpr, BACKWARD: tl.constexpr, POS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                 POS_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # anchors are visited in label order (``order``), so a block holds one or two classes and the
    # HC positive passes cover only their columns; anchor rows are gathered through ``order``
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs < N
    d_ok = offs_d < D
    rows = tl.load(order_ptr + offs, mask=p_ok, other=0).to(tl.int64)
    lab = tl.load(lab_ptr + rows, mask=p_ok, other=-1)
    anchor = p_ok & (lab >= 0)
    zrow = rows[:, None] * D + offs_d[None, :]
    zmask = p_ok[:, None] & d_ok[None, :]
    zh, zn = _unit_rows(z_ptr, zrow, zmask)
    zd = zh.to(g_ptr.dtype.element_ty)  # the dot operand: fp32, or bf16/fp16 as the inputs
    # columns of the block's classes; no anchor -> class C, so lo = C Q = NCOL (a class-index
    # sentinel: NCOL * Q would overflow int32 for big banks)
    lo = tl.min(tl.where(anchor, lab, NCOL // tl.maximum(Q, 1)), axis=0) * Q
    hi = (tl.max(tl.where(anchor, lab, -1), axis=0) + 1) * Q
    ncol = tl.where(hi > 0, NCOL, 0)  # a block without anchors skips every pass
    if LC:  # the positive's cosine first: its rows need not stay live through the loops
        ph, pn = _unit_rows(pos_ptr, zrow, zmask)
        s_pos = tl.sum(zh * ph, axis=1)

    # pass 1: NEG_p = sum of e^{b} over the valid entries of the other classes, b = s / t, kept as
    # (m, S) with NEG = S e^m and m the running max (online rescaling as in flash attention)
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, ncol, BLOCK_N):
        sim, _, gcls, gok = _bank_tile(zd, g_ptr, fill_ptr, start, offs_d, d_ok, NCOL, Q, D, PRECISION, UPCAST,
                                       BLOCK_N)
        b = tl.where(gok[None, :] & (gcls[None, :] != lab[:, None]), sim * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(b, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_sum = s_sum * tl.exp(m - m_safe) + tl.sum(tl.exp(b - m_safe[:, None]), axis=1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_neg = tl.where(s_sum > 0, m_safe + tl.log(tl.where(s_sum > 0, s_sum, 1.0)), float("-inf"))
    lne = _lse2(log_neg, log_eps)  # log(NEG + eps); -inf only when both are 0

    # pass 2: the loss (HC: over the positives of the anchor's class; LC: its explicit positive).
    # w_neg = dl/dNEG e^m summed over the positives: every negative's coefficient is w_neg e^{b - m}.
    loss = tl.zeros([BLOCK_P], dtype=tl.float32)
    w_neg = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)  # sum_j dl/da_j g_j (HC positives here)
    b_acc = tl.zeros([BLOCK_P], dtype=tl.float32)  # sum_j dl/da_j s_j (the radial part)
    p_max = tl.zeros([BLOCK_P], dtype=tl.float32)  # max_k |dl/da_k| over the positives
    if LC:
        loss, ratio, log_d, da_pos = _positive_terms(s_pos * inv_t, lne, log_eps)
        w_neg = ratio * tl.exp(m - log_d)  # 0 without negatives (m = -inf)
    else:
        for start in range(lo, hi, BLOCK_N):
            sim, g, gcls, gok = _bank_tile(zd, g_ptr, fill_ptr, start, offs_d, d_ok, NCOL, Q, D, PRECISION, UPCAST,
                                           BLOCK_N)
            is_pos = gok[None, :] & (gcls[None, :] == lab[:, None])
            l_k, ratio, log_d, da = _positive_terms(sim * inv_t, lne[:, None], log_eps)
            loss += tl.sum(tl.where(is_pos, l_k, 0.0), axis=1)
            w_neg += tl.sum(tl.where(is_pos, ratio * tl.exp(m[:, None] - log_d), 0.0), axis=1)
            if BACKWARD:
                # fp32 coefficients (|dl/da| <= 1 may be far below fp16's range): a TF32/IEEE dot
                # over ~Q columns, next to the bf16/fp16 dot over all C Q negatives in pass 3
                coef = tl.where(is_pos, da, 0.0)
                acc += _dot(coef, g.to(tl.float32), POS_PRECISION, False)
                b_acc += tl.sum(coef * sim, axis=1)
                p_max = tl.maximum(p_max, tl.max(-coef, axis=1))

    if not BACKWARD:
        tl.store(loss_ptr + rows, tl.where(anchor, loss, 0.0), mask=p_ok)
    else:
        # pass 3: negatives, coefficient w_neg e^{b - m}. One accumulator (registers: D = 256 fp32
        # columns per anchor) in units of f = max(w_neg, p_max), the size of the largest
        # coefficient: the dot operand (w_neg / f) e^{b - m} lies in [0, 1] and what of it flushes
        # to zero in fp16 is < 6e-8 of the largest term; |acc / f| <= Q cannot overflow
        f = tl.maximum(w_neg, p_max)
        f = tl.where(f > 0, f, 1.0)
        w_rel = w_neg / f
        acc = acc / f[:, None]
        b_acc = b_acc / f
        for start in range(0, ncol, BLOCK_N):
            sim, g, gcls, gok = _bank_tile(zd, g_ptr, fill_ptr, start, offs_d, d_ok, NCOL, Q, D, PRECISION, UPCAST,
                                           BLOCK_N)
            is_neg = gok[None, :] & (gcls[None, :] != lab[:, None])
            e = tl.where(is_neg, w_rel[:, None] * tl.exp(sim * inv_t - m_safe[:, None]), 0.0)
            acc += _dot(e.to(g.dtype), g, PRECISION, UPCAST)
            b_acc += tl.sum(e * sim, axis=1)
        acc = acc * f[:, None]
        b_acc = b_acc * f
        scale = tl.where(anchor, tl.load(scale_ptr + rows, mask=p_ok, other=0.0), 0.0) * inv_t
        # reloaded rather than kept live through the loops, where acc needs the registers; the
        # epilogue folds row scalars first so that at most three [P, D] blocks are live
        # d cos(z, g^) / dz = (g^ - cos z^) / |z|, times dl/ds = inv_t dl/da (inv_t is in scale)
        zh, zn = _unit_rows(z_ptr, zrow, zmask)
        radial = b_acc
        if LC:
            radial += da_pos * s_pos
        dz = acc - radial[:, None] * zh
        if LC:
            ph, pn = _unit_rows(pos_ptr, zrow, zmask)
            dz += da_pos[:, None] * ph
        inv_zn = tl.where(zn > 0, 1.0 / tl.where(zn > 0, zn, 1.0), 0.0)
        tl.store(dz_ptr + zrow, dz * (scale * inv_zn)[:, None], mask=zmask)
        if LC:
            if POS_GRAD:
                inv_pn = tl.where(pn > 0, 1.0 / tl.where(pn > 0, pn, 1.0), 0.0)
                dp = (zh - s_pos[:, None] * ph) * (da_pos * inv_pn * scale)[:, None]
                tl.store(dp_ptr + zrow, dp, mask=zmask)


def resolve_precision(precision: str, dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for bank dtype ``dtype`` under the launcher's ``precision``.

    bf16/fp16 go to the tensor cores as given (fp32 accumulation). fp32: "ieee" or "tf32" as
    asked. The op decides it: its "auto" follows PyTorch's own switch for fp32 matmuls, read when
    it launches ("highest", the default, -> IEEE; "high"/"medium" or ``fp32_precision = "tf32"``
    -> TF32), and its autograd pins the forward's choice for the backward.
    Why: the logits are cos / t fed to exp, so TF32's 2^-11 rounding of the unit rows moves a
    logit by up to ~2^-10 / t (1e-2 at t = 0.1), which is why IEEE stays the default; a user who
    opted into TF32 for the model's matmuls expects it here too, and the reference then runs its
    matmuls in TF32 as well, so A/B comparisons stay like for like.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS} (the op resolves 'auto'), got {precision!r}")
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit operands; the default there
    return precision


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def bank_tile_key(half: bool, dot_precision: str, backward: bool) -> str:
    """The ``BANK_TILES`` entry a launch uses."""
    if _interpreting():
        return "interpret"
    return ("half" if half else dot_precision) + ("_bwd" if backward else "")


def _bank_launch(z, labels, bank, positive, fill, mode, temperature, eps, precision, grad=None,
                 positive_grad=False):
    n, d = z.shape
    c, q = bank.shape[:2]
    device = z.device
    lc = mode == "lc"
    half = z.dtype in (torch.float16, torch.bfloat16)
    dot_precision = resolve_precision(precision, z.dtype)
    # unit bank rows, rounded once to the dot dtype (O(C Q D), the size of the bank itself); slots
    # past fill zeroed: the kernel masks them, but a masked inf would still make 0 * inf = NaN
    counts = torch.full((c,), q, dtype=torch.int32, device=device) if fill is None else fill.to(torch.int32)
    gf = bank.reshape(c * q, d).float()
    gn = gf.norm(dim=1, keepdim=True)
    in_fill = (torch.arange(q, device=device) < counts[:, None]).reshape(c * q, 1)
    g = torch.where(in_fill & (gn > 0), gf / gn, 0.0).to(z.dtype if half else torch.float32)
    lab = labels.long()
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
    order = torch.sort(lab32).indices.to(torch.int32) if n < 2**31 else torch.sort(lab32).indices
    backward = grad is not None
    loss = torch.empty(n, dtype=torch.float32, device=device)
    dz = torch.empty((n, d), dtype=torch.float32, device=device) if backward else loss
    dp = torch.empty((n, d), dtype=torch.float32, device=device) if backward and positive_grad else dz
    scale = (weight_p * grad.float()).contiguous() if backward else loss
    if n:
        block_p, block_n, warps, stages = BANK_TILES[bank_tile_key(half, dot_precision, backward)]
        _bank_kernel[(triton.cdiv(n, block_p),)](
            z, order, lab32, positive if lc else z, g, counts, scale, loss, dz, dp, n, c * q, q, d,
            1.0 / float(temperature), math.log(eps) if eps > 0 else float("-inf"),
            LC=lc, BACKWARD=backward, POS_GRAD=bool(positive_grad), PRECISION=dot_precision,
            POS_PRECISION="ieee" if dot_precision == "ieee" else "tf32", UPCAST=half and z.dtype == torch.bfloat16 and _interpreting(), BLOCK_P=block_p, BLOCK_N=block_n,
            BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=warps, num_stages=stages)  # tl.dot: K >= 16
    if backward:
        out = [dz.to(z.dtype)]
        if positive_grad:
            out.append(dp.to(positive.dtype))
        return out
    if not n:
        return z.new_zeros(())
    return (loss * weight_p).sum().to(z.dtype)


def class_bank_contrast(z: Tensor, labels: Tensor, bank: Tensor, positive: Tensor | None, fill: Tensor | None,
                        mode: str, temperature: float, eps: float, precision: str) -> Tensor:
    """CTT HC/LC loss (``mode`` "hc" or "lc"), a 0-d tensor of z's dtype, of anchors ``z``
    float16/bfloat16/float32 [N, D], ``labels`` int32 or int64 [N] (< 0: not an anchor), ``bank``
    [C, Q, D] and (lc) ``positive`` [N, D] of z's dtype (hc: None), ``fill`` int32 or int64 [C]
    (None: full banks); ``precision`` "ieee" or "tf32" (fp32 dots)."""
    return _bank_launch(z, labels, bank, positive, fill, mode, temperature, eps, precision)


def class_bank_contrast_backward(grad: Tensor, z: Tensor, labels: Tensor, bank: Tensor, positive: Tensor | None,
                                 fill: Tensor | None, mode: str, temperature: float, eps: float, precision: str,
                                 positive_grad: bool) -> list[Tensor]:
    """[dz] or, with ``positive_grad``, [dz, d_positive], each [N, D] in its input's dtype, of
    :func:`class_bank_contrast` scaled by ``grad`` float 0-d; same arguments (``z``
    float16/bfloat16/float32 [N, D], ``labels`` int32 or int64 [N], ``bank`` [C, Q, D],
    ``positive`` [N, D] or None, ``fill`` int32 or int64 [C] or None)."""
    return _bank_launch(z, labels, bank, positive, fill, mode, temperature, eps, precision, grad=grad,
                        positive_grad=positive_grad)


def _bank_accepts(*args) -> bool:
    # float64 runs the reference: the kernel computes in fp32 at best
    z = args[1] if isinstance(args[0], torch.Tensor) and args[0].dim() == 0 else args[0]
    return z.dtype != torch.float64


class_bank_contrast.accepts = _bank_accepts
class_bank_contrast_backward.accepts = _bank_accepts

LAUNCHERS = {"sampled_contrast": sampled_contrast, "sampled_contrast_backward": sampled_contrast_backward,
             "class_bank_contrast": class_bank_contrast, "class_bank_contrast_backward": class_bank_contrast_backward}
