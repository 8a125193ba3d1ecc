"""Fused IPixMatch spatial-softmax KL (spec/methods.md 5c): Triton kernels and their launchers.

Layout: teacher p and student q [B, C, HW] (contiguous NCHW), ignore [B, HW]. A row is one
(image, class) over HW pixels (100k-640k at real sizes), so each row is split over
ceil(HW / BLOCK_J) programs: program (b, s) loads the [C, BLOCK_J] tiles of p and q once, derives
Omega (teacher channel-softmax max > tau, not ignored) for its pixels from that same tile, and
writes per class the partial statistics of its chunk over Omega:

    m_p = max p/t,  s_p = sum e^{p/t - m_p},  x = sum e^{p/t - m_p} (p - q)/t,
    m_q = max q/t,  s_q = sum e^{q/t - m_q},  n = |Omega in chunk|.

The forward launcher merges the chunks with the usual rescaling (a few [B, S, C] tensor ops, about
1/(2 BLOCK_J) of the input bytes) into LSE_p, LSE_q and the cross term, and returns the per-image
statistics LSE [B, 2, C], KL_bk = x / s_p - LSE_p + LSE_q [B, C] and |Omega_b| [B]. The weight
1 / (C ln |Omega_b|), the reduction and the gradient's per-image scale are not computed here: the
op (semiseg_fast.ops.spatial_kl) applies them with the reference's formulas, which this module
cannot import (kernels import nothing from the package).

The backward is one kernel that reads p and q once and writes dq once, from the forward's LSE and
the op's per-image scale s_b: dq_kj = s_b (e^{q_kj/t - LSE_q} - e^{p_kj/t - LSE_p}) on Omega,
else 0. All arithmetic is fp32 whatever the input dtype; offsets are int64.
Everything stays on the device: no host reads, so a captured step never waits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Launch tiles, read at every call (profiling/tune.py sweeps them with unittest.mock.patch.dict).
TILES = {"BLOCK_J": 128}


@triton.jit
def _omega_tile(p_ptr, ign_ptr, b, offs_c, offs_j, C, HW, tau, HAS_IGNORE: tl.constexpr):
    """Load the [BLOCK_C, BLOCK_J] teacher tile (fp32, -inf padding) and its Omega mask [BLOCK_J]."""
    row = b.to(tl.int64) * C * HW
    c_ok = offs_c < C
    j_ok = offs_j < HW
    ptrs = p_ptr + row + offs_c[:, None].to(tl.int64) * HW + offs_j[None, :]
    p = tl.load(ptrs, mask=c_ok[:, None] & j_ok[None, :], other=float("-inf")).to(tl.float32)
    p_max = tl.max(p, axis=0)
    p_max_safe = tl.where(j_ok, p_max, 0.0)
    denom = tl.sum(tl.exp(p - p_max_safe[None, :]), axis=0)
    # max_c softmax = 1 / denom > tau
    omega = j_ok & (1.0 > tau * denom)
    if HAS_IGNORE:
        ign = tl.load(ign_ptr + b.to(tl.int64) * HW + offs_j, mask=j_ok, other=1)
        omega = omega & (ign == 0)
    return p, omega


@triton.jit
def _tiles(p_ptr, q_ptr, ign_ptr, C, HW, tau, HAS_IGNORE: tl.constexpr, BLOCK_C: tl.constexpr,
           BLOCK_J: tl.constexpr):
    """The program's p and q tiles (fp32), Omega, the kept (class, pixel) mask and the offsets."""
    b = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    p, omega = _omega_tile(p_ptr, ign_ptr, b, offs_c, offs_j, C, HW, tau, HAS_IGNORE)
    c_ok = offs_c < C
    in_range = c_ok[:, None] & (offs_j < HW)[None, :]
    offs = b.to(tl.int64) * C * HW + offs_c[:, None].to(tl.int64) * HW + offs_j[None, :]
    q = tl.load(q_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    return p, q, omega, c_ok[:, None] & omega[None, :], offs, in_range, offs_c


@triton.jit
def _kl_partials_kernel(p_ptr, q_ptr, ign_ptr, stats_ptr, count_ptr, C, HW, S, inv_t, tau,
                        HAS_IGNORE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    p, q, omega, keep, _, _, offs_c = _tiles(p_ptr, q_ptr, ign_ptr, C, HW, tau, HAS_IGNORE, BLOCK_C, BLOCK_J)

    a = tl.where(keep, p * inv_t, float("-inf"))
    m_p = tl.max(a, axis=1)
    m_p_safe = tl.where(m_p == float("-inf"), 0.0, m_p)
    e_p = tl.where(keep, tl.exp(a - m_p_safe[:, None]), 0.0)
    s_p = tl.sum(e_p, axis=1)
    # select before multiplying: p is -inf padding and q may be non-finite outside Omega
    x = tl.sum(e_p * tl.where(keep, p - q, 0.0), axis=1) * inv_t
    bq = tl.where(keep, q * inv_t, float("-inf"))
    m_q = tl.max(bq, axis=1)
    m_q_safe = tl.where(m_q == float("-inf"), 0.0, m_q)
    s_q = tl.sum(tl.where(keep, tl.exp(bq - m_q_safe[:, None]), 0.0), axis=1)

    # stats layout [B, S, 5, BLOCK_C]
    base = stats_ptr + ((b.to(tl.int64) * S + s) * 5) * BLOCK_C + offs_c
    tl.store(base, m_p)
    tl.store(base + BLOCK_C, s_p)
    tl.store(base + 2 * BLOCK_C, x)
    tl.store(base + 3 * BLOCK_C, m_q)
    tl.store(base + 4 * BLOCK_C, s_q)
    tl.store(count_ptr + b.to(tl.int64) * S + s, tl.sum(omega.to(tl.int32), axis=0))


@triton.jit
def _kl_grad_kernel(p_ptr, q_ptr, ign_ptr, lse_ptr, scale_ptr, dq_ptr, C, HW, inv_t, tau,
                    HAS_IGNORE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0)
    p, q, omega, keep, offs, in_range, offs_c = _tiles(p_ptr, q_ptr, ign_ptr, C, HW, tau, HAS_IGNORE, BLOCK_C,
                                                       BLOCK_J)
    c_ok = offs_c < C
    lse_p = tl.load(lse_ptr + (b.to(tl.int64) * 2) * C + offs_c, mask=c_ok, other=0.0)
    lse_q = tl.load(lse_ptr + (b.to(tl.int64) * 2 + 1) * C + offs_c, mask=c_ok, other=0.0)
    scale = tl.load(scale_ptr + b)
    g = tl.exp(q * inv_t - lse_q[:, None]) - tl.exp(p * inv_t - lse_p[:, None])
    dq = tl.where(keep, g, 0.0) * scale
    tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty), mask=in_range)


def _statistics(p, q, temperature, tau, ignore):
    """Per image: LSE_p, LSE_q [B, 2, BLOCK_C], the KL per class [B, C] and |Omega| [B] (int64)."""
    b, c = p.shape[:2]
    hw = p.numel() // (b * c)
    block_c = triton.next_power_of_2(c)
    block_j = TILES["BLOCK_J"]
    s = triton.cdiv(hw, block_j)
    stats = torch.empty((b, s, 5, block_c), dtype=torch.float32, device=p.device)
    counts = torch.empty((b, s), dtype=torch.int32, device=p.device)
    has_ignore = ignore is not None
    _kl_partials_kernel[(b, s)](p, q, ignore if has_ignore else p, stats, counts, c, hw, s, 1.0 / temperature,
                                tau, HAS_IGNORE=has_ignore, BLOCK_C=block_c, BLOCK_J=block_j)
    m_p, s_p, x, m_q, s_q = stats.unbind(2)

    def merge(m, *sums):
        top = m.amax(dim=1, keepdim=True)
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows with no Omega
        w = torch.exp(m - top)  # 0 for empty chunks (m = -inf)
        return top.squeeze(1), [(v * w).sum(dim=1) for v in sums]

    top_p, (sum_p, cross) = merge(m_p, s_p, x)
    top_q, (sum_q,) = merge(m_q, s_q)
    lse_p = top_p + torch.log(sum_p)
    lse_q = top_q + torch.log(sum_q)
    n = counts.sum(dim=1, dtype=torch.int64)
    kl = (cross / sum_p - lse_p + lse_q)[:, :c]
    return torch.stack((lse_p, lse_q), dim=1), kl, n


def spatial_kl(p, q, temperature, tau, ignore):
    """Per-image statistics of the spatial KL over Omega (the op applies weight and reduction).

    ``p``, ``q`` float [B, C, H, W] (contiguous, one dtype), ``ignore`` bool [B, H, W] or None;
    ``temperature`` > 0 and ``tau`` Python floats. Returns ``lse`` float32 [B, 2, C] (LSE_p, LSE_q
    of p/t and q/t over Omega_b; -inf where Omega_b is empty), ``kl`` float32 [B, C] (KL per class;
    meaningless, possibly NaN, where |Omega_b| < 2) and ``n`` int64 [B] (|Omega_b|).
    """
    c = p.shape[1]
    ign = None if ignore is None else ignore.view(torch.uint8)
    lse, kl, n = _statistics(p, q, float(temperature), float(tau), ign)
    return lse[:, :, :c].contiguous(), kl, n


def spatial_kl_backward(p, q, lse, scale, temperature, tau, ignore):
    """dq = s_b (softmax_j(q_k/t) - softmax_j(p_k/t)) over Omega_b, 0 elsewhere, in one pass.

    ``p``, ``q`` float [B, C, H, W] (contiguous, one dtype), ``lse`` float32 [B, 2, C] from
    :func:`spatial_kl`, ``scale`` float [B] (the op's per-image factor s_b; used in float32),
    ``ignore`` bool [B, H, W] or None. Returns ``dq`` [B, C, H, W] in the dtype of ``q``.
    """
    b, c = p.shape[:2]
    hw = p.numel() // (b * c)
    ign = None if ignore is None else ignore.view(torch.uint8)
    # rows without Omega have LSE = -inf; their pixels are all masked, but keep the exp finite
    lse = torch.where(torch.isfinite(lse), lse, 0.0).contiguous()
    dq = torch.empty_like(q)
    has_ignore = ign is not None
    block_j = TILES["BLOCK_J"]
    _kl_grad_kernel[(b, triton.cdiv(hw, block_j))](
        p, q, ign if has_ignore else p, lse, scale.float().contiguous(), dq, c, hw, 1.0 / float(temperature),
        float(tau), HAS_IGNORE=has_ignore, BLOCK_C=triton.next_power_of_2(c), BLOCK_J=block_j)
    return dq


LAUNCHERS = {"spatial_kl": spatial_kl, "spatial_kl_backward": spatial_kl_backward}
