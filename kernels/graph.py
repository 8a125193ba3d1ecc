"""MLLC graph propagation (spec/methods.md 5b) without any N x N matrix in memory.

Both graphs of the layer are applied by streaming their tiles: a tile of the graph is recomputed
from O(N) per-node data whenever it is needed, so memory beyond the inputs is O(N) (a stored
O(N k) CSR would need a device-side compaction of the kept entries and a second gather-style
kernel; recomputing a tile costs one ``tl.dot`` that the apply pass needs anyway).

Semantic graph (``graph_mix``), per image of N nodes with unit features F^ [N, D]:

1. ``_topk_kernel``: each program streams the similarity tiles S = max(0, F^_I F^_J^T) of a row
   block through ``tl.dot`` and keeps a sorted buffer of the KP largest values per row (merge =
   ``tl.sort`` of buffer and tile); theta_i = the k-th largest. KP = max(32, next power of 2 of k)
   and the tiles are KP x KP, so k <= 64 (MLLC's 21 uses 32; larger k runs the reference; a
   128-wide buffer would work the same way but is untested: the interpreter needs ~10 minutes for
   it). Ties at theta are all kept, as the reference's value rule.
2. ``_degree_kernel``: the same tiles again, A = S' + S'^T with S'_ij = S_ij [S_ij >= theta_i]
   (each S'_ji taken from the tile of row j's own block, bit-identical to what its top-k saw, so
   the k-th neighbour is never lost to a last-bit difference and A is exactly symmetric), degree
   d_i = sum_j A_ij.
3. ``_apply_kernel``: (A^ X)_I = d_I^-1/2 sum_J (A_IJ d_J^-1/2) X_J with a second ``tl.dot``; the
   forward applies it to Z, the backward to l1 g (A^ is symmetric, so no transpose), taking theta
   and d^-1/2 from the forward (the op's ``state`` output), so it runs this pass alone.

Three passes (the last two computing each tile and its transpose) of N^2 D work, instead of the
dense reference's N x N similarity, top-k and normalised graph (and the official code's two N^3
``diag_embed`` products). Every ``tl.dot`` takes fp32 operands at ``SETTINGS["DOT_PRECISION"]`` = "tf32x3":
three TF32 tensor-core products (big x big + big x small + small x big) that carry fp32-level error
(~2^-22 relative per term, the dropped small x small), where plain TF32 (10-bit mantissa, ~1e-3)
would move pixels across theta and far off the fp32 reference, and "ieee" runs on the FMA units
(no tensor cores, ~1/7 of H100's TF32 rate). Each tile is still recomputed bit-identically across
the passes, so theta stays self-consistent. "ieee" is one entry away (`profiling/tune.py` sweeps both).
Why the recomputation is exact on a GPU as in the interpreter: the three kernels build every
similarity tile with the one function ``_sim_tile``, at the same tile sizes, feature chunk, chunk
order and warps (``TILES`` is keyed by the tile size alone), so Triton lowers it to the same
tensor-core instructions (``profiling.aot`` records them; ``tests/test_aot.py`` checks that the
top-k and degree kernels use the same ones); an MMA is deterministic and accumulates in program
order; the tf32x3 split is a rounding to TF32 and an exact fp32 subtraction; and the only other
operation on a tile is the clamp at 0. No approximate instruction (``ex2.approx``, ``div.full``)
touches a similarity before the comparison with theta.
The per-row top-k stays in Triton: the issue's CUDA C++ alternative is conditioned on a GPU
measurement of this kernel that has not been made yet. One launch covers a batch of B independent
graphs of N nodes each (inputs [B, N, *], the grid's last axis is the image): MLLC's per-image
graphs at VOC are 10 x 1681 nodes, and one graph alone would be 53 row programs per pass, fewer
than an H100's 132 SMs; the batch is 530.

Class graph (``class_propagate``). With the intended label-equality mask it needs no kernel: P2 >= 0
makes it block-diagonal of rank C, so Q^ X is two O(N C^2 D) GEMMs in torch, which the op runs
(``reference.class_graph_lowrank``), on the device, without host reads. The official scrambled
mask M_ij = [OH'_i . OH'_j != 0] is not low-rank; it streams through the same degree and apply
kernels with the class tile Q_IJ = max(0, P2^_I P2^_J^T) [M_IJ]: the op hands over the one-hot
rows OH' [N, C] (built on the device, O(N C)), packed here into 31-bit words per node, so M_IJ is
an AND of words, exact, with no extra dot. Pass 1 gives e = (rowsum Q + 1e-10)^-1/2, pass 2
F' = e * (Q (e * F)); the backward is the same apply on g (Q^ is symmetric up to the rounding of its tile products: no threshold acts on Q,
so a last-bit difference between Q_ij and Q_ji only moves dF by rounding). Nodes whose OH' row is
zero have an empty row: F' = 0 there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as nnf
import triton
import triton.language as tl
from torch import Tensor

_MAX_K = 64
# Read by the launchers at every call (profiling/tune.py sweeps them).
SETTINGS = {
    "DOT_PRECISION": "tf32x3",  # see the module docstring; a kernel argument, so it can be swept
    "CLASS_BLOCK": 64,  # class-graph tiles: no top-k buffer ties their size
    "MAX_BLOCK_X": 128,  # apply columns per program: X = F has D = 256 columns, a 2-D grid splits them
}
_WORD_BITS = 31  # mask bits per int32 word, sign bit unused so packing never overflows


def _block(k: int) -> int:
    # top-k buffer = tile width (the merge joins the two); tile height = width, so the transposed
    # tile of a row block is bit for bit the tile of a column block (see _graph_tile)
    return max(32, triton.next_power_of_2(k))


# Per square tile size: feature columns per dot (the K chunk of every similarity tile), warps and
# pipeline stages. Whole 256-column operands needed 128-410 KB of shared memory and spilled up to
# 20 KB per thread; these are candidates that compiled with profiling.aot for sm_90 and sm_80
# under Triton 3.6 and 3.9 without a spill in either (results/aot_sm90.csv).
TILES = {32: {"chunk": 16, "num_warps": 4, "num_stages": 1},
         64: {"chunk": 16, "num_warps": 8, "num_stages": 2},
         128: {"chunk": 16, "num_warps": 8, "num_stages": 1}}


def _dot_width(d: int, block: int) -> int:
    # tl.dot needs K >= 16 on GPUs; D = 256 runs in TILES[block]["chunk"]-column steps
    return min(max(16, triton.next_power_of_2(d)), TILES[block]["chunk"])


def _launch_options(block: int) -> dict:
    return {"num_warps": TILES[block]["num_warps"], "num_stages": TILES[block]["num_stages"]}


@triton.jit
def _sim_tile(f_ptr, offs_r, offs_n, offs_d, N, D, PRECISION: tl.constexpr):
    # the feature axis in chunks of len(offs_d) columns (TILES), always in the same order, so a
    # tile recomputed by another pass is the same sequence of dots (see the module docstring)
    r_ok = offs_r < N
    n_ok = offs_n < N
    s = tl.zeros([offs_r.shape[0], offs_n.shape[0]], dtype=tl.float32)
    for d0 in range(0, D, offs_d.shape[0]):
        cols = d0 + offs_d
        d_ok = cols < D
        fr = tl.load(f_ptr + offs_r.to(tl.int64)[:, None] * D + cols[None, :], mask=r_ok[:, None] & d_ok[None, :],
                     other=0.0)
        fn = tl.load(f_ptr + offs_n.to(tl.int64)[:, None] * D + cols[None, :], mask=n_ok[:, None] & d_ok[None, :],
                     other=0.0)
        s = tl.dot(fr, tl.trans(fn), s, input_precision=PRECISION)
    return tl.where(s < 0, 0.0, s), n_ok


@triton.jit
def _topk_kernel(f_ptr, theta_ptr, N, D, K, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    img = tl.program_id(1).to(tl.int64)
    f_ptr += img * N * D
    theta_ptr += img * N
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_R, KP], -1.0, tl.float32)  # below any clamped similarity
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s, n_ok = _sim_tile(f_ptr, offs_r, offs_n, offs_d, N, D, PRECISION)
        s = tl.where(n_ok[None, :], s, -1.0)
        both = tl.reshape(tl.join(best, s), [BLOCK_R, 2 * KP])
        both = tl.sort(both, dim=1, descending=True)
        # keep the first KP: [R, 2, KP] -> [R, KP, 2] -> split off the upper half
        best, _ = tl.split(tl.permute(tl.reshape(both, [BLOCK_R, 2, KP]), (0, 2, 1)))
    pick = tl.arange(0, KP)[None, :] == (K - 1)
    theta = tl.sum(tl.where(pick, best, 0.0), axis=1)
    tl.store(theta_ptr + offs_r, theta, mask=offs_r < N)


@triton.jit
def _graph_tile(f_ptr, theta_ptr, offs_r, offs_n, offs_d, N, D, PRECISION: tl.constexpr):
    # S'_IJ and S'_JI each from the very tile the top-k pass of its rows computed (same shapes, same
    # operand order): theta_j is one of row j's values, so comparing a recomputed S_ij that differs
    # in the last bit would drop the k-th neighbour; A = S' + S'^T is then exactly symmetric
    s, n_ok = _sim_tile(f_ptr, offs_r, offs_n, offs_d, N, D, PRECISION)
    s_t, _ = _sim_tile(f_ptr, offs_n, offs_r, offs_d, N, D, PRECISION)
    s_t = tl.trans(s_t)
    th_r = tl.load(theta_ptr + offs_r, mask=offs_r < N, other=float("inf"))
    th_n = tl.load(theta_ptr + offs_n, mask=n_ok, other=float("inf"))
    a = tl.where(s >= th_r[:, None], s, 0.0) + tl.where(s_t >= th_n[None, :], s_t, 0.0)
    return tl.where((offs_r < N)[:, None] & n_ok[None, :], a, 0.0), n_ok


@triton.jit
def _class_tile(p_ptr, words_ptr, offs_r, offs_n, offs_c, N, C, NW, PRECISION: tl.constexpr):
    # Q_IJ = max(0, P2^_I . P2^_J) where the OH' rows share a set bit. Out-of-range nodes load
    # empty words, so their rows and columns are zero without a separate bounds mask.
    q, n_ok = _sim_tile(p_ptr, offs_r, offs_n, offs_c, N, C, PRECISION)
    r_ok = offs_r < N
    shared = tl.zeros(q.shape, dtype=tl.int32)
    for word in range(0, NW):
        wr = tl.load(words_ptr + offs_r.to(tl.int64) * NW + word, mask=r_ok, other=0)
        wn = tl.load(words_ptr + offs_n.to(tl.int64) * NW + word, mask=n_ok, other=0)
        shared = shared | (wr[:, None] & wn[None, :])
    return tl.where(shared != 0, q, 0.0), n_ok


@triton.jit
def _tile(feat_ptr, aux_ptr, offs_r, offs_n, offs_d, N, D, NW, CLASS_GRAPH: tl.constexpr, PRECISION: tl.constexpr):
    # aux is theta [N] for the semantic graph, the packed OH' words [N, NW] for the class graph
    if CLASS_GRAPH:
        a, n_ok = _class_tile(feat_ptr, aux_ptr, offs_r, offs_n, offs_d, N, D, NW, PRECISION)
    else:
        a, n_ok = _graph_tile(feat_ptr, aux_ptr, offs_r, offs_n, offs_d, N, D, PRECISION)
    return a, n_ok


@triton.jit
def _degree_kernel(feat_ptr, aux_ptr, deg_ptr, N, D, NW, AUX_STRIDE, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, CLASS_GRAPH: tl.constexpr, PRECISION: tl.constexpr):
    img = tl.program_id(1).to(tl.int64)
    feat_ptr += img * N * D
    aux_ptr += img * AUX_STRIDE
    deg_ptr += img * N
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    deg = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        a, _ = _tile(feat_ptr, aux_ptr, offs_r, offs_n, offs_d, N, D, NW, CLASS_GRAPH, PRECISION)
        deg += tl.sum(a, axis=1)
    tl.store(deg_ptr + offs_r, deg, mask=offs_r < N)


@triton.jit
def _apply_kernel(feat_ptr, aux_ptr, dinv_ptr, x_ptr, out_ptr, N, D, NW, AUX_STRIDE, CX,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
                  CLASS_GRAPH: tl.constexpr, PRECISION: tl.constexpr):
    img = tl.program_id(2).to(tl.int64)
    feat_ptr += img * N * D
    aux_ptr += img * AUX_STRIDE
    dinv_ptr += img * N
    x_ptr += img * N * CX
    out_ptr += img * N * CX
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_x = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = offs_x < CX
    acc = tl.zeros([BLOCK_R, BLOCK_X], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        a, n_ok = _tile(feat_ptr, aux_ptr, offs_r, offs_n, offs_d, N, D, NW, CLASS_GRAPH, PRECISION)
        dn = tl.load(dinv_ptr + offs_n, mask=n_ok, other=0.0)
        xn = tl.load(x_ptr + offs_n.to(tl.int64)[:, None] * CX + offs_x[None, :], mask=n_ok[:, None] & x_ok[None, :],
                     other=0.0)
        acc += tl.dot(a * dn[None, :], xn, input_precision=PRECISION)
    dr = tl.load(dinv_ptr + offs_r, mask=offs_r < N, other=0.0)
    tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * CX + offs_x[None, :], acc * dr[:, None],
             mask=(offs_r < N)[:, None] & x_ok[None, :])


class _Graph(NamedTuple):
    """What applying a batch of streamed graphs needs, O(B N) beyond its inputs."""

    feat: torch.Tensor  # unit rows whose clamped Gram gives the tiles: F^ [B, N, D] or P2^ [B, N, C]
    aux: torch.Tensor  # theta [B, N] (semantic) or packed OH' words int32 [B, N, NW] (class)
    dinv: torch.Tensor  # d^-1/2 (semantic) or e (class), [B, N]
    words: int  # NW (0 for the semantic graph)
    block: int  # square tile size
    is_class: bool


def _images(x: torch.Tensor) -> torch.Tensor:
    # one graph [N, ch] is a batch of one; the launchers give results the caller's shape back
    return x if x.dim() == 3 else x[None]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = _images(x).float()
    return (x / (x.norm(dim=-1, keepdim=True) + 1e-9)).contiguous()


def _with_degrees(feat: torch.Tensor, aux: torch.Tensor, words: int, block: int, is_class: bool) -> _Graph:
    b, n, d = feat.shape
    deg = torch.empty((b, n), dtype=torch.float32, device=feat.device)
    _degree_kernel[(triton.cdiv(n, block), b)](feat, aux, deg, n, d, words, aux[0].numel(), BLOCK_R=block,
                                                BLOCK_N=block, BLOCK_D=_dot_width(d, block), CLASS_GRAPH=is_class,
                                                PRECISION=SETTINGS["DOT_PRECISION"], **_launch_options(block))
    return _Graph(feat, aux, torch.pow(deg + 1e-10, -0.5), words, block, is_class)


def semantic_graph(F: Tensor, k: int) -> _Graph:
    """Top-k and degree passes (three similarity products) of the graphs of ``F`` float [N, D] or
    [B, N, D]: all an application of A^ needs, O(B N): unit rows float32 [B, N, D], theta float32
    [B, N] and d^-1/2 float32 [B, N].

    Public so that profiling can time the similarity tiles alone.
    """
    f = _unit_rows(F)
    b, n, d = f.shape
    theta = torch.empty((b, n), dtype=torch.float32, device=F.device)
    blk = _block(k)
    _topk_kernel[(triton.cdiv(n, blk), b)](f, theta, n, d, k, BLOCK_R=blk, BLOCK_N=blk, KP=blk,
                                            BLOCK_D=_dot_width(d, blk), PRECISION=SETTINGS["DOT_PRECISION"],
                                            **_launch_options(blk))
    return _with_degrees(f, theta, 0, blk, False)


def _mask_words(onehot: torch.Tensor) -> torch.Tensor:
    """Pack a 0/1 [..., C] matrix into int32 words [..., ceil(C / 31)] on the device, O(N C)."""
    c = onehot.shape[-1]
    nw = triton.cdiv(c, _WORD_BITS)
    bits = nnf.pad(onehot.long(), (0, nw * _WORD_BITS - c)).unflatten(-1, (nw, _WORD_BITS))
    weights = torch.pow(2, torch.arange(_WORD_BITS, device=onehot.device, dtype=torch.int64))
    return (bits * weights).sum(dim=-1).to(torch.int32).contiguous()  # < 2^31 by construction


def _class_graph(logits: torch.Tensor, onehot: torch.Tensor) -> _Graph:
    # the tiles' products at SETTINGS["DOT_PRECISION"], as the semantic graph's: plain TF32's
    # 10-bit mantissa would put ~1e-3 relative errors on every Q_ij, far outside the fp32
    # reference's rounding that the tests hold the op to; tf32x3 keeps fp32-level error on the
    # tensor cores
    p = _unit_rows(torch.softmax(logits.float(), dim=-1))
    words = _mask_words(onehot).view(*p.shape[:2], -1)
    return _with_degrees(p, words, words.shape[-1], SETTINGS["CLASS_BLOCK"], True)


def _apply(graph: _Graph, X: torch.Tensor) -> torch.Tensor:
    b, n, d = graph.feat.shape
    x = _images(X).float().contiguous()
    cx = x.shape[-1]
    out = torch.empty_like(x)
    block_x = min(max(triton.next_power_of_2(cx), 16), SETTINGS["MAX_BLOCK_X"])
    # the same tile shape as the passes that made theta, so every S_ij is recomputed bit for bit
    grid = (triton.cdiv(n, graph.block), triton.cdiv(cx, block_x), b)
    _apply_kernel[grid](graph.feat, graph.aux, graph.dinv, x, out, n, d, graph.words, graph.aux[0].numel(), cx,
                        BLOCK_R=graph.block, BLOCK_N=graph.block, BLOCK_D=_dot_width(d, graph.block),
                        BLOCK_X=block_x, CLASS_GRAPH=graph.is_class, PRECISION=SETTINGS["DOT_PRECISION"],
                        **_launch_options(graph.block))
    return out.view(X.shape)


def graph_mix(Z: Tensor, F: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(A^ Z float32 [N, C], state float32 [N, 2]) of logits ``Z`` float [N, C] under the kNN
    graph A^ of features ``F`` float [N, D] (or [B, N, *]: a graph per image); the op mixes A^ Z
    with Z. state = (theta, d^-1/2) per node."""
    graph = semantic_graph(F, k)
    z_graph = _apply(graph, Z)
    # (theta, d^-1/2) per node: the backward reuses them instead of repeating the top-k (its merge
    # sorts are the costliest pass) and degree passes, 3 of the 5 similarity products per direction
    state = torch.stack((graph.aux, graph.dinv), dim=-1).view(*Z.shape[:-1], 2)
    return z_graph, state


def graph_mix_backward(grad: Tensor, l1: Tensor, F: Tensor, k: int, state: Tensor | None) -> Tensor:
    """A^ (l1 grad) float32 [N, C] of ``grad`` float [N, C] and the mix weights ``l1`` float [N, 1],
    A^ the kNN graph of ``F`` float [N, D] (or [B, N, *]), from the forward's ``state`` float32
    [N, 2] or, when None, rebuilt; the op adds l2 grad."""
    if state is None:
        graph = semantic_graph(F, k)
    else:
        # the unit rows are recomputed by the same torch ops as in the forward, bit for bit, so the
        # apply pass sees exactly the similarities its theta was taken from
        state = _images(state)
        graph = _Graph(_unit_rows(F), state[..., 0].contiguous(), state[..., 1].contiguous(), 0, _block(k), False)
    return _apply(graph, l1.float() * grad.float())


def class_propagate(logits: Tensor, onehot: Tensor, F: Tensor) -> Tensor:
    """Q^ F [N, D] in F's dtype: the class graph of softmax(``logits`` float [N, C]) under the mask
    [OH_i . OH_j != 0] of the 0/1 rows ``onehot`` int64 [N, C'] (the official layout's OH'),
    applied to ``F`` float [N, D] (or [B, N, *])."""
    return _apply(_class_graph(logits, onehot), F).to(F.dtype)


def class_propagate_backward(grad: Tensor, logits: Tensor, onehot: Tensor) -> Tensor:
    """Q^ grad [N, D] in grad's dtype (Q^ is symmetric: the gradient of :func:`class_propagate`) of
    ``grad`` float [N, D], ``logits`` float [N, C] and ``onehot`` int64 [N, C'] (or [B, N, *])."""
    return _apply(_class_graph(logits, onehot), grad).to(grad.dtype)


def _small_k(Z, F, k):
    return k <= _MAX_K


def _small_k_backward(grad, l1, F, k, state):
    return k <= _MAX_K


graph_mix.accepts = _small_k
graph_mix_backward.accepts = _small_k_backward
# class_propagate takes every input it is given: the op keeps the intended mask (rank-C torch form)

LAUNCHERS = {"graph_mix": graph_mix, "graph_mix_backward": graph_mix_backward,
             "class_propagate": class_propagate, "class_propagate_backward": class_propagate_backward}
