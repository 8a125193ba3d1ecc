"""U2PL entropy, exact percentiles and class-rank masks (spec/methods.md 5d): Triton kernels.

* ``entropy``: one read of the logits [B, C, HW]; per pixel the channel softmax and
  H = -sum_c p_c log(p_c + 1e-10) (the official formula), fp32 accumulation.
* ``percentile``: numpy's linear percentile without a sort and without the host. Every value is
  mapped, inside the kernel, to an unsigned 32-bit key that orders like the float (sign flip), and
  the k-th smallest key is found by radix selection, 8 bits per pass: one kernel per pass
  histograms, for all wanted ranks at once, the keys that share the prefix decided so far
  (``tl.histogram`` per block, then 256 int64 atomic adds per block and rank), and a few [K, 256]
  tensor ops pick the next byte of each prefix. Pass 1 needs a single histogram (every prefix is
  empty), and also gives n (its total) and the NaN count, so the float64 ranks
  r = (n - 1) q / 100, the weights and numpy's lerp are computed on the device after it. Four
  passes give the exact order statistics x_(floor r) and x_(floor r + 1) of every q (K = 2 len(q)
  ranks, one shared set of passes: U2PL's three thresholds cost four reads of the values, 4 bytes
  each, and no key tensor is ever stored). Empty selection gives 0, NaN among the selected
  values gives NaN (the op's definitions).
* ``rank_mask``: per pixel the rank of every class among C by counting (one other class at a
  time, so [C, J] counts are live, not a [C, C, J] cube), with the fixed tie rule
  rank(c) = #{c' : p_c' > p_c} + #{c' < c : p_c' = p_c}; one read of prob, two bit maps written.
* ``teacher_stats``: the fused single pass of U2PL's teacher. One launch, two kinds of program:
  the first kind covers the output grid (H, W) and up-samples the low-resolution logits in
  registers (bilinear, align_corners=True: the 4 neighbours of every output pixel, as
  ``F.interpolate``), then writes entropy, max probability and arg-max (lowest class among equal
  maxima); the second kind covers the logits' own grid and writes the softmax and both rank bit
  maps. The up-sampled logits (88 MB at VOC) never exist in memory, and the low-resolution
  logits (5.6 MB at VOC) should be read from DRAM about once: the 4 neighbour reads of the first
  kind and the reads of the second kind are expected to hit L2 (50 MB on an H100; not yet
  measured). Constexpr flags drop the outputs nobody asked for.
* the CUDA C++ alternative of ``percentile`` (csrc/radix_select.cu): the same multi-rank selection with the
  digit pick, the rank computation and numpy's lerp on the device too (8 launches, no torch glue);
  chosen with ``SEMISEG_RADIX_SELECT=cuda`` or :func:`use_radix_select`, built on first use, and
  replaced by the Triton selection, with one warning, wherever it cannot be built.

The keys are 32-bit, so the launchers accept float32/bf16/fp16 (``accepts``); float64 inputs run
the references under "auto" and are refused, naming the dtype, under a forced "triton".
Offsets are int64 wherever a product can pass 2^31.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# Launch tiles, read at every call (profiling/tune.py sweeps them with unittest.mock.patch.dict).
TILES = {
    "BLOCK_J": 128,
    "BLOCK_N": 1024,
    "BLOCK_OUT": 64,  # output-grid pixels per program: 128 spilled ~300 bytes under Triton 3.6 (profiling.aot)
    "BLOCK_LOGIT": 64,  # logit-grid pixels per program (the rank count keeps [C, J] int32 counts)
    "RANK_WARPS": 8,  # rank_mask launch: 4 spilled ~400 bytes at 128 x 128 logits under Triton 3.9 (profiling.aot)
}
_SIGN = 0x80000000  # host-side key arithmetic only


@triton.jit
def _softmax_cols(x, c_ok):
    """Channel softmax of a [BLOCK_C, BLOCK_J] fp32 tile whose padded classes hold -inf.

    All -inf columns (padded pixels) get a 0 shift instead of -inf, so the shift itself is never
    NaN; their probabilities are 0/0 = NaN and are never stored."""
    x_max = tl.max(x, axis=0)
    x_max = tl.where(x_max == float("-inf"), 0.0, x_max)
    e = tl.where(c_ok[:, None], tl.exp(x - x_max[None, :]), 0.0)
    return e / tl.sum(e, axis=0)[None, :], x_max


@triton.jit
def _official_entropy(p, c_ok):
    return -tl.sum(tl.where(c_ok[:, None], p * tl.log(p + 1e-10), 0.0), axis=0)


@triton.jit
def _rank_bits(p, offs_c, C, low, high, BLOCK_C: tl.constexpr):
    """The two U2PL bit maps of a [BLOCK_C, BLOCK_J] probability tile, by counting (the tie rule
    of the module docstring): rank(c) = #{c' : p_c' > p_c} + #{c' < c : p_c' = p_c}.

    One class c' at a time, its row taken out of the tile by a masked sum (exact: one non-zero
    term), so only [C, J] values are live instead of a [C, C, J] comparison cube."""
    rank = tl.zeros(p.shape, dtype=tl.int32)
    for other in tl.static_range(BLOCK_C):
        p_other = tl.sum(tl.where(offs_c[:, None] == other, p, 0.0), axis=0)[None, :]
        before = (p_other > p) | ((p_other == p) & (other < offs_c[:, None]))
        rank += (before & (other < C)).to(tl.int32)
    return (rank >= low) & (rank < high), rank < low


@triton.jit
def _entropy_kernel(x_ptr, out_ptr, C, HW, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    # pixel tiles on grid axis 0 (up to 2^31 - 1; axis 1 stops at 65535 = 8.4M pixels per image)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    c_ok = offs_c < C
    j_ok = offs_j < HW
    ptrs = x_ptr + b.to(tl.int64) * C * HW + offs_c[:, None].to(tl.int64) * HW + offs_j[None, :]
    x = tl.load(ptrs, mask=c_ok[:, None] & j_ok[None, :], other=float("-inf")).to(tl.float32)
    p, _ = _softmax_cols(x, c_ok)
    tl.store(out_ptr + b.to(tl.int64) * HW + offs_j, _official_entropy(p, c_ok), mask=j_ok)


@triton.jit
def _output_grid_tile(x_ptr, ent_ptr, maxp_ptr, arg_ptr, tile, C, h, w, H, W, first_image,
                      tiles_per_image, scale_y, scale_x, RESAMPLE: tl.constexpr,
                      WANT_ENT: tl.constexpr, WANT_MAX: tl.constexpr, WANT_ARG: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """Entropy / max probability / arg-max of one tile of the (H, W) grid of image b."""
    b_out = tile // tiles_per_image
    offs_j = (tile % tiles_per_image) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    j_ok = offs_j < H * W
    io = c_ok[:, None] & j_ok[None, :]
    base = x_ptr + (b_out + first_image).to(tl.int64) * C * h * w + offs_c[:, None].to(tl.int64) * h * w
    if RESAMPLE:
        # PyTorch's align_corners=True source index in fp32: src = dst * (in - 1) / (out - 1),
        # lower neighbour floor(src), upper one clamped to the last row/column.
        sy = (offs_j // W).to(tl.float32) * scale_y
        sx = (offs_j % W).to(tl.float32) * scale_x
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        y1 = tl.where(y0 < h - 1, y0 + 1, y0)
        x1 = tl.where(x0 < w - 1, x0 + 1, x0)
        ly1 = (sy - y0.to(tl.float32))[None, :]
        lx1 = (sx - x0.to(tl.float32))[None, :]
        ly0 = 1.0 - ly1
        lx0 = 1.0 - lx1
        v00 = tl.load(base + (y0 * w + x0)[None, :], mask=io, other=0.0).to(tl.float32)
        v01 = tl.load(base + (y0 * w + x1)[None, :], mask=io, other=0.0).to(tl.float32)
        v10 = tl.load(base + (y1 * w + x0)[None, :], mask=io, other=0.0).to(tl.float32)
        v11 = tl.load(base + (y1 * w + x1)[None, :], mask=io, other=0.0).to(tl.float32)
        x = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
        x = tl.where(io, x, float("-inf"))
    else:
        x = tl.load(base + offs_j[None, :], mask=io, other=float("-inf")).to(tl.float32)
    p, x_max = _softmax_cols(x, c_ok)
    out = b_out.to(tl.int64) * H * W + offs_j
    if WANT_ENT:
        tl.store(ent_ptr + out, _official_entropy(p, c_ok), mask=j_ok)
    if WANT_MAX:
        tl.store(maxp_ptr + out, tl.max(p, axis=0), mask=j_ok)
    if WANT_ARG:
        # torch.argmax's rule: the first NaN class if any, else the lowest class among equal
        # maxima; compared with the raw maximum, since x_max is shifted to 0 where all are -inf
        raw_max = tl.max(x, axis=0)
        first_max = tl.min(tl.where(c_ok[:, None] & (x == raw_max[None, :]), offs_c[:, None], BLOCK_C), axis=0)
        first_nan = tl.min(tl.where(c_ok[:, None] & (x != x), offs_c[:, None], BLOCK_C), axis=0)
        first = tl.where(first_nan < BLOCK_C, first_nan, first_max)
        tl.store(arg_ptr + out, tl.minimum(first, C - 1).to(tl.int64), mask=j_ok)


@triton.jit
def _logit_grid_tile(x_ptr, prob_ptr, unl_ptr, lab_ptr, tile, C, HW, tiles_per_image, low, high,
                     WANT_PROB: tl.constexpr, WANT_RANK: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """Softmax and rank bits of one tile of the logits' own grid."""
    b = tile // tiles_per_image
    offs_j = (tile % tiles_per_image) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    io = c_ok[:, None] & (offs_j < HW)[None, :]
    offs = b.to(tl.int64) * C * HW + offs_c[:, None].to(tl.int64) * HW + offs_j[None, :]
    x = tl.load(x_ptr + offs, mask=io, other=float("-inf")).to(tl.float32)
    p, _ = _softmax_cols(x, c_ok)
    if WANT_PROB:
        tl.store(prob_ptr + offs, p, mask=io)
    if WANT_RANK:
        unl, lab = _rank_bits(p, offs_c, C, low, high, BLOCK_C)
        tl.store(unl_ptr + offs, unl.to(tl.int8), mask=io)
        tl.store(lab_ptr + offs, lab.to(tl.int8), mask=io)


@triton.jit
def _teacher_stats_kernel(x_ptr, ent_ptr, maxp_ptr, arg_ptr, prob_ptr, unl_ptr, lab_ptr,
                          C, h, w, H, W, first_image, out_tiles, out_tiles_per_image,
                          logit_tiles_per_image, scale_y, scale_x, low, high,
                          RESAMPLE: tl.constexpr, WANT_ENT: tl.constexpr, WANT_MAX: tl.constexpr,
                          WANT_ARG: tl.constexpr, WANT_PROB: tl.constexpr, WANT_RANK: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_LOGIT: tl.constexpr):
    # one launch for both grids: programs [0, out_tiles) take the output grid, the rest the
    # logits' grid, so the logits are fetched while they are still in L2 for the other kind
    pid = tl.program_id(0)
    if pid < out_tiles:
        _output_grid_tile(x_ptr, ent_ptr, maxp_ptr, arg_ptr, pid, C, h, w, H, W, first_image,
                          out_tiles_per_image, scale_y, scale_x, RESAMPLE, WANT_ENT, WANT_MAX,
                          WANT_ARG, BLOCK_C, BLOCK_OUT)
    else:
        _logit_grid_tile(x_ptr, prob_ptr, unl_ptr, lab_ptr, pid - out_tiles, C, h * w,
                         logit_tiles_per_image, low, high, WANT_PROB, WANT_RANK, BLOCK_C, BLOCK_LOGIT)


@triton.jit
def _radix_hist_kernel(x_ptr, valid_ptr, prefix_ptr, hist_ptr, nan_ptr, N, shift,
                       HAS_VALID: tl.constexpr, K: tl.constexpr, FIRST: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + offs, mask=ok, other=0) != 0)
    v = tl.load(x_ptr + offs, mask=ok, other=0.0)
    # the order-preserving key of the float bits, made here: no key tensor is ever stored
    bits = v.to(tl.int32, bitcast=True)
    unsigned = bits.to(tl.uint32, bitcast=True).to(tl.int64)
    key = tl.where(bits < 0, unsigned ^ 0xFFFFFFFF, unsigned | 0x80000000)
    digit = ((key >> shift) & 255).to(tl.int32)
    bins = tl.arange(0, 512)
    if FIRST:
        # every prefix is still empty: one histogram serves all ranks; NaNs are counted on the way
        h = tl.histogram(tl.where(ok, digit, 256), 512)
        tl.atomic_add(hist_ptr + bins, h.to(tl.int64), mask=bins < 256)
        tl.atomic_add(nan_ptr, tl.sum((ok & (v != v)).to(tl.int64)))
    else:
        high = key >> (shift + 8)
        for k in tl.static_range(K):
            prefix = tl.load(prefix_ptr + k)
            match = ok & (high == prefix)
            # non-matching lanes land in bin 256, which is never added
            h = tl.histogram(tl.where(match, digit, 256), 512)
            # int64 counts: one bin may hold more than 2^31 of the n values
            tl.atomic_add(hist_ptr + k * 256 + bins, h.to(tl.int64), mask=bins < 256)


@triton.jit
def _rank_mask_kernel(p_ptr, unl_ptr, lab_ptr, C, HW, low, high,
                      BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(1)  # pixel tiles on axis 0, as in _entropy_kernel
    offs_c = tl.arange(0, BLOCK_C)
    offs_j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    io_mask = (offs_c < C)[:, None] & (offs_j < HW)[None, :]
    offs = b.to(tl.int64) * C * HW + offs_c[:, None].to(tl.int64) * HW + offs_j[None, :]
    p = tl.load(p_ptr + offs, mask=io_mask, other=0.0).to(tl.float32)
    unl, lab = _rank_bits(p, offs_c, C, low, high, BLOCK_C)
    tl.store(unl_ptr + offs, unl.to(tl.int8), mask=io_mask)
    tl.store(lab_ptr + offs, lab.to(tl.int8), mask=io_mask)


# -- host-side glue (device tensors only: no reads back to the host) ------------------------------

def _floats(keys: torch.Tensor) -> torch.Tensor:
    """float32 values of int64 keys in [0, 2^32) (the inverse of the kernel's key map)."""
    bits = torch.where(keys >= _SIGN, keys ^ _SIGN, keys ^ 0xFFFFFFFF)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def _numpy_ranks(n: torch.Tensor, q: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """numpy's order statistics (lo, hi) and weight g of every q among n values, on the device:
    r = (n - 1) q / 100 in float64; at r >= n - 1 both are the last and g = r + 1 (its index -1).
    The rule of semiseg_fast.reference.percentile, restated on device tensors: kernels import
    nothing from the package, and pass 1's n stays on the device."""
    last = (n - 1).clamp_min(0)
    # Python-float factors: no host-to-device copy of q
    r = torch.stack([last.double() * (pct / 100.0) for pct in q])
    below = torch.floor(r)
    at_end = r >= last.double()
    lo = torch.where(at_end, last, below.long())
    hi = torch.where(at_end, last, below.long() + 1)
    return lo, hi, torch.where(at_end, r + 1, r - below)


def _select(vals: torch.Tensor, valid: torch.Tensor | None, q: list[float]):
    """Keys of the lo and hi order statistics of every q among the valid values (4 radix passes),
    with n, the weights g and the NaN count, all on the device."""
    k = 2 * len(q)
    dev = vals.device
    prefix = torch.zeros(k, dtype=torch.int64, device=dev)
    nans = torch.zeros((), dtype=torch.int64, device=dev)
    block_n = TILES["BLOCK_N"]
    grid = (max(triton.cdiv(vals.numel(), block_n), 1),)
    remaining = n = g = None
    for shift in (24, 16, 8, 0):
        first = remaining is None
        hist = torch.zeros((1 if first else k, 256), dtype=torch.int64, device=dev)
        _radix_hist_kernel[grid](vals, valid if valid is not None else vals, prefix, hist, nans, vals.numel(),
                                 shift, HAS_VALID=valid is not None, K=1 if first else k, FIRST=first,
                                 BLOCK_N=block_n)
        cum = torch.cumsum(hist, dim=1).expand(k, 256).contiguous()
        if first:
            n = cum[0, -1]
            lo, hi, g = _numpy_ranks(n, q)
            remaining = torch.cat((lo, hi))
        digit = torch.searchsorted(cum, remaining.unsqueeze(1), right=True).squeeze(1).clamp_max(255)
        below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0)
        remaining = remaining - below
        prefix = prefix * 256 + digit
    return prefix, n, g, nans


def _lerp_numpy(keys: torch.Tensor, g: torch.Tensor, n: torch.Tensor, nans: torch.Tensor) -> torch.Tensor:
    a, b = _floats(keys).chunk(2)
    diff = b - a
    # numpy's _lerp in the value dtype, with g and 1 - g rounded from float64 first
    out = torch.where(g >= 0.5, b - diff * (1.0 - g).float(), a + diff * g.float())
    out = torch.where(nans > 0, float("nan"), out)
    return torch.where(n > 0, out, 0.0)


RADIX_SELECTS = ("triton", "cuda")
_CUDA_MAX_Q = 16  # kMaxQuantiles of csrc/radix_select.cu; more q run the Triton selection
RADIX_SELECT_ENV = "SEMISEG_RADIX_SELECT"
_radix_override: str | None = None


@contextlib.contextmanager
def use_radix_select(name: str) -> Iterator[None]:
    """Select the percentiles inside the block with ``name``: "triton" (default) or "cuda" (the
    C++ kernel of csrc/radix_select.cu; CUDA tensors only, Triton wherever it cannot be built)."""
    global _radix_override
    if name not in RADIX_SELECTS:
        raise ValueError(f"name: expected one of {RADIX_SELECTS}, got {name!r}")
    previous, _radix_override = _radix_override, name
    try:
        yield
    finally:
        _radix_override = previous


def radix_select() -> str:
    """The selection in use: the innermost :func:`use_radix_select`, else $SEMISEG_RADIX_SELECT,
    else "triton" (the default until a GPU measurement says the C++ one is faster)."""
    name = _radix_override or os.environ.get(RADIX_SELECT_ENV) or "triton"
    if name not in RADIX_SELECTS:
        raise ValueError(f"{RADIX_SELECT_ENV}: expected one of {RADIX_SELECTS}, got {name!r}")
    return name


def _cuda_select():
    """The compiled csrc/radix_select.cu module, or None (csrc.build warned once why)."""
    return importlib.import_module(f"{__package__.rpartition('.')[0]}.csrc.build").load("radix_select")


def _percentiles_fp32(values: torch.Tensor, q: list[float], valid: torch.Tensor | None) -> torch.Tensor:
    """numpy.percentile (linear) of float32 ``values`` over ``valid``, one result per q, float32."""
    vals = values.reshape(-1).float()
    if vals.is_cuda and radix_select() == "cuda" and len(q) <= _CUDA_MAX_Q:
        ext = _cuda_select()
        if ext is not None:
            return ext.radix_percentile(vals, None if valid is None else valid.reshape(-1),
                                        [pct / 100.0 for pct in q])
    flat_valid = None if valid is None else valid.reshape(-1).view(torch.uint8)
    keys, n, g, nans = _select(vals, flat_valid, q)
    return _lerp_numpy(keys, g, n, nans)


def entropy_percentile(logits, q, valid):
    """Entropy map of the channel softmax and its percentiles over ``valid``.

    ``logits`` float32/bf16/fp16 [B, C, H, W] (contiguous), ``q`` a list of floats in [0, 100],
    ``valid`` bool [B, H, W] or None (every pixel). Returns ``entropy`` float32 [B, H, W] and
    ``thresholds`` float32 [len(q)]: numpy's linear percentiles of ``entropy[valid]`` (0 for an
    empty selection, NaN when a selected value is NaN).
    """
    b, c, h, w = logits.shape
    ent = torch.empty((b, h, w), dtype=torch.float32, device=logits.device)
    if ent.numel():
        block_j = TILES["BLOCK_J"]
        _entropy_kernel[(triton.cdiv(h * w, block_j), b)](logits, ent, c, h * w, BLOCK_C=triton.next_power_of_2(c),
                                                          BLOCK_J=block_j)
    return ent, _percentiles_fp32(ent, q, valid)


def percentile(values, q, valid):
    """numpy's linear percentiles of ``values`` over ``valid``, one radix selection for all of ``q``.

    ``values`` float32/bf16/fp16 of any shape [...] (contiguous), ``q`` a list of floats in
    [0, 100], ``valid`` bool of the shape of ``values`` or None. Returns [len(q)] in the dtype of
    ``values`` (interpolated in float32, rounded once; 0 for an empty selection, NaN when a
    selected value is NaN).
    """
    return _percentiles_fp32(values, q, valid).to(values.dtype)


def rank_mask(prob, low_rank, high_rank):
    """U2PL's negative-class masks by counting ranks over classes (the module docstring's tie rule).

    ``prob`` float32/bf16/fp16 [B, C, H, W] (contiguous), ``low_rank`` < ``high_rank`` ints.
    Returns (``unlabeled``, ``labeled``), bool [B, C, H, W] each: low_rank <= rank(c) < high_rank
    and rank(c) < low_rank.
    """
    b, c = prob.shape[:2]
    hw = prob.numel() // max(b * c, 1)
    unl = torch.empty(prob.shape, dtype=torch.int8, device=prob.device)
    lab = torch.empty(prob.shape, dtype=torch.int8, device=prob.device)
    if prob.numel():
        block_logit = TILES["BLOCK_LOGIT"]
        _rank_mask_kernel[(triton.cdiv(hw, block_logit), b)](prob, unl, lab, c, hw, low_rank, high_rank,
                                                             BLOCK_C=triton.next_power_of_2(c),
                                                             BLOCK_J=block_logit, num_warps=TILES["RANK_WARPS"])
    return unl.view(torch.bool), lab.view(torch.bool)


def _align_corners_scale(src: int, dst: int) -> float:
    """(src - 1) / (dst - 1) rounded once to fp32, as PyTorch's float ``area_pixel_compute_scale``
    (a float64 quotient rounded to fp32 could differ in the last bit)."""
    if dst <= 1:
        return 0.0
    return float(torch.tensor(src - 1, dtype=torch.float32) / torch.tensor(dst - 1, dtype=torch.float32))


def teacher_stats(logits, size, first_image, want_entropy, want_max_prob, want_argmax, want_prob,
                  want_rank, low_rank, high_rank):
    """U2PL's single pass over teacher logits: one launch for both grids.

    ``logits`` float32/bf16/fp16 [B, C, h, w] (contiguous), ``size`` (H, W) the output grid,
    ``first_image`` the first image of the output grid, ``want_*`` bools, ``low_rank`` <
    ``high_rank`` ints. Returns (``entropy`` float32, ``max_prob`` float32, ``argmax`` int64, each
    [B - first_image, H, W]; ``prob`` float32 [B, C, h, w]; ``unlabeled``, ``labeled`` bool
    [B, C, h, w]), every output not wanted as an empty tensor of shape [0].
    """
    b, c, h, w = logits.shape
    out_h, out_w = size
    dev = logits.device
    n_out = b - first_image if (want_entropy or want_max_prob or want_argmax) else 0
    grid_shape, logit_shape = (n_out, out_h, out_w), (b, c, h, w)

    def maybe(wanted, shape, dtype):
        return torch.empty(shape if wanted else (0,), dtype=dtype, device=dev)

    ent = maybe(want_entropy, grid_shape, torch.float32)
    maxp = maybe(want_max_prob, grid_shape, torch.float32)
    arg = maybe(want_argmax, grid_shape, torch.int64)
    prob = maybe(want_prob, logit_shape, torch.float32)
    unl = maybe(want_rank, logit_shape, torch.int8)
    lab = maybe(want_rank, logit_shape, torch.int8)
    block_out, block_logit = TILES["BLOCK_OUT"], TILES["BLOCK_LOGIT"]
    out_per_image = triton.cdiv(out_h * out_w, block_out)
    logit_per_image = triton.cdiv(h * w, block_logit)
    out_tiles = n_out * out_per_image
    logit_tiles = b * logit_per_image if (want_prob or want_rank) else 0
    if out_tiles + logit_tiles and c:
        _teacher_stats_kernel[(out_tiles + logit_tiles,)](
            logits, ent, maxp, arg, prob, unl, lab, c, h, w, out_h, out_w, first_image, out_tiles,
            out_per_image, logit_per_image, _align_corners_scale(h, out_h),
            _align_corners_scale(w, out_w), low_rank, high_rank,
            RESAMPLE=(out_h, out_w) != (h, w), WANT_ENT=want_entropy, WANT_MAX=want_max_prob,
            WANT_ARG=want_argmax, WANT_PROB=want_prob, WANT_RANK=want_rank,
            BLOCK_C=triton.next_power_of_2(c), BLOCK_OUT=block_out, BLOCK_LOGIT=block_logit)
    return ent, maxp, arg, prob, unl.view(torch.bool), lab.view(torch.bool)


def _not_float64(x, *_):
    return x.dtype != torch.float64


entropy_percentile.accepts = percentile.accepts = rank_mask.accepts = _not_float64
teacher_stats.accepts = _not_float64

LAUNCHERS = {"entropy_percentile": entropy_percentile, "percentile": percentile, "rank_mask": rank_mask,
             "teacher_stats": teacher_stats}
