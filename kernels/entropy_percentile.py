"""U2PL entropy, exact percentiles and class-rank masks (spec/methods.md 5d): Triton kernels.

* ``entropy``: one read of the logits [B, C, HW]; per pixel the channel softmax and
  H = -sum_c p_c log(p_c + 1e-10) (the official formula), fp32 accumulation.
* ``percentile``: numpy's linear percentile without a sort and without the host. Every value is
  mapped to an unsigned 32-bit key that orders like the float (sign flip), and the k-th smallest
  key is found by radix selection, 8 bits per pass: one kernel per pass histograms, for all wanted
  ranks at once, the keys that share the prefix decided so far (``tl.histogram`` per block, then
  256 atomic adds per block and rank), and a few [K, 256] tensor ops pick the next byte of each
  prefix. Four passes give the exact order statistics x_(floor r) and x_(floor r + 1) of every q
  (K = 2 len(q) ranks, one shared set of passes: U2PL's three thresholds cost four reads of the
  entropy). The float64 rank r = (n - 1) q / 100, the weight and numpy's lerp are computed on the
  device from the device count n, so nothing waits for the host. Empty selection gives 0, NaN among
  the selected values gives NaN (the op's definitions).
* ``rank_mask``: per pixel the rank of every class among C by counting, with the fixed tie rule
  rank(c) = #{c' : p_c' > p_c} + #{c' < c : p_c' = p_c}; one read of prob, two bit maps written.

The keys are 32-bit, so the launchers accept float32/bf16/fp16 (``accepts``); float64 inputs run
the references under "auto" and are refused, naming the dtype, under a forced "triton".
Offsets are int64 wherever a product can pass 2^31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_J = 128
_BLOCK_N = 1024
_SIGN = 0x80000000  # host-side key arithmetic only


@triton.jit
def _entropy_kernel(x_ptr, out_ptr, C, HW, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    c_ok = offs_c < C
    j_ok = offs_j < HW
    ptrs = x_ptr + b.to(tl.int64) * C * HW + offs_c[:, None].to(tl.int64) * HW + offs_j[None, :]
    x = tl.load(ptrs, mask=c_ok[:, None] & j_ok[None, :], other=float("-inf")).to(tl.float32)
    x_max = tl.where(j_ok, tl.max(x, axis=0), 0.0)
    e = tl.exp(x - x_max[None, :])
    p = e / tl.sum(e, axis=0)[None, :]
    h = -tl.sum(tl.where(c_ok[:, None], p * tl.log(p + 1e-10), 0.0), axis=0)
    tl.store(out_ptr + b.to(tl.int64) * HW + offs_j, h, mask=j_ok)


@triton.jit
def _radix_hist_kernel(key_ptr, valid_ptr, prefix_ptr, hist_ptr, N, shift,
                       HAS_VALID: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + offs, mask=ok, other=0) != 0)
    key = tl.load(key_ptr + offs, mask=ok, other=0)
    digit = ((key >> shift) & 255).to(tl.int32)
    high = key >> (shift + 8)
    bins = tl.arange(0, 512)
    for k in tl.static_range(K):
        prefix = tl.load(prefix_ptr + k)
        match = ok & (high == prefix)
        # non-matching lanes land in bin 256, which is never added
        h = tl.histogram(tl.where(match, digit, 256), 512)
        tl.atomic_add(hist_ptr + k * 256 + bins, h, mask=bins < 256)


@triton.jit
def _rank_mask_kernel(p_ptr, unl_ptr, lab_ptr, C, HW, low, high,
                      BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    c_ok = offs_c < C
    j_ok = offs_j < HW
    offs = b.to(tl.int64) * C * HW + offs_c[:, None].to(tl.int64) * HW + offs_j[None, :]
    io_mask = c_ok[:, None] & j_ok[None, :]
    p = tl.load(p_ptr + offs, mask=io_mask, other=0.0).to(tl.float32)
    mine = p[:, None, :]  # [c, 1, j]
    other = p[None, :, :]  # [1, c', j]
    c_me = offs_c[:, None, None]
    c_other = offs_c[None, :, None]
    before = (other > mine) | ((other == mine) & (c_other < c_me))
    before = before & (c_other < C)
    rank = tl.sum(before.to(tl.int32), axis=1)
    tl.store(unl_ptr + offs, ((rank >= low) & (rank < high)).to(tl.int8), mask=io_mask)
    tl.store(lab_ptr + offs, (rank < low).to(tl.int8), mask=io_mask)


# -- host-side glue (device tensors only: no reads back to the host) ------------------------------

def _keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) that order like the float32 values (negative floats reversed)."""
    bits = values.reshape(-1).float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= _SIGN, bits ^ 0xFFFFFFFF, bits | _SIGN)


def _floats(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= _SIGN, keys ^ _SIGN, keys ^ 0xFFFFFFFF)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def _select(keys: torch.Tensor, valid: torch.Tensor | None, ranks: torch.Tensor) -> torch.Tensor:
    """Keys of the given 0-based ranks [K] among the valid keys, by 4 radix passes."""
    k = ranks.shape[0]
    n = keys.shape[0]
    prefix = torch.zeros(k, dtype=torch.int64, device=keys.device)
    remaining = ranks.clone()
    grid = (max(triton.cdiv(n, _BLOCK_N), 1),)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros((k, 256), dtype=torch.int32, device=keys.device)
        _radix_hist_kernel[grid](keys, valid if valid is not None else keys, prefix, hist, n, shift,
                                 HAS_VALID=valid is not None, K=k, BLOCK_N=_BLOCK_N)
        cum = torch.cumsum(hist, dim=1, dtype=torch.int64)
        digit = torch.searchsorted(cum, remaining.unsqueeze(1), right=True).squeeze(1).clamp_max(255)
        below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0)
        remaining = remaining - below
        prefix = prefix * 256 + digit
    return prefix


def _percentiles_fp32(values: torch.Tensor, q: list[float], valid: torch.Tensor | None) -> torch.Tensor:
    """numpy.percentile (linear) of float32 ``values`` over ``valid``, one result per q, float32."""
    flat_valid = None if valid is None else valid.reshape(-1).view(torch.uint8)
    vals = values.reshape(-1).float()
    if flat_valid is None:
        n = torch.full((), vals.numel(), dtype=torch.int64, device=vals.device)
        nan = torch.isnan(vals).any()
    else:
        n = flat_valid.sum(dtype=torch.int64)
        nan = (torch.isnan(vals) & valid.reshape(-1)).any()
    last = (n - 1).clamp_min(0)
    lo, hi, g = [], [], []
    for pct in q:
        r = last.double() * (pct / 100.0)
        below = torch.floor(r)
        at_end = r >= last.double()
        lo.append(torch.where(at_end, last, below.long()))
        hi.append(torch.where(at_end, last, below.long() + 1))
        g.append(torch.where(at_end, r + 1, r - below))
    g = torch.stack(g)
    keys = _select(_keys(vals), flat_valid, torch.cat((torch.stack(lo), torch.stack(hi))))
    a, b = _floats(keys).chunk(2)
    diff = b - a
    # numpy's _lerp in the value dtype, with g and 1 - g rounded from float64 first
    out = torch.where(g >= 0.5, b - diff * (1.0 - g).float(), a + diff * g.float())
    out = torch.where(nan, float("nan"), out)
    return torch.where(n > 0, out, 0.0)


def entropy_percentile(logits, q, valid):
    b, c, h, w = logits.shape
    ent = torch.empty((b, h, w), dtype=torch.float32, device=logits.device)
    if ent.numel():
        _entropy_kernel[(b, triton.cdiv(h * w, _BLOCK_J))](logits, ent, c, h * w, BLOCK_C=triton.next_power_of_2(c),
                                                           BLOCK_J=_BLOCK_J)
    return ent, _percentiles_fp32(ent, q, valid)


def percentile(values, q, valid):
    return _percentiles_fp32(values, q, valid).to(values.dtype)


def rank_mask(prob, low_rank, high_rank):
    b, c = prob.shape[:2]
    hw = prob.numel() // max(b * c, 1)
    unl = torch.empty(prob.shape, dtype=torch.int8, device=prob.device)
    lab = torch.empty(prob.shape, dtype=torch.int8, device=prob.device)
    if prob.numel():
        _rank_mask_kernel[(b, triton.cdiv(hw, 32))](prob, unl, lab, c, hw, low_rank, high_rank,
                                                    BLOCK_C=triton.next_power_of_2(c), BLOCK_J=32)
    return unl.view(torch.bool), lab.view(torch.bool)


def _not_float64(x, *_):
    return x.dtype != torch.float64


entropy_percentile.accepts = percentile.accepts = rank_mask.accepts = _not_float64

LAUNCHERS = {"entropy_percentile": entropy_percentile, "percentile": percentile, "rank_mask": rank_mask}
