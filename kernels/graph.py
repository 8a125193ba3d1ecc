"""MLLC graph propagation (spec/methods.md 5b) without any N x N matrix in memory.

Semantic graph (``graph_mix``), per image of N nodes with unit features F^ [N, D]:

1. ``_topk_kernel``: each program streams the similarity tiles S = max(0, F^_I F^_J^T) of a row
   block through ``tl.dot`` and keeps a sorted buffer of the KP largest values per row (merge =
   ``tl.sort`` of buffer and tile); theta_i = the k-th largest. KP = max(32, next power of 2 of k)
   and the tiles are KP x KP, so k <= 64 (MLLC's 21 uses 32; larger k runs the reference; a
   128-wide buffer would work the same way but is untested: the interpreter needs ~10 minutes for it). Ties at theta are all kept, as the
   reference's value rule.
2. ``_degree_kernel``: the same tiles again, A = S' + S'^T with S'_ij = S_ij [S_ij >= theta_i]
   (each S'_ji taken from the tile of row j's own block, bit-identical to what its top-k saw, so
   the k-th neighbour is never lost to a last-bit difference and A is exactly symmetric), degree
   d_i = sum_j A_ij.
3. ``_apply_kernel``: (A^ X)_I = d_I^-1/2 sum_J (A_IJ d_J^-1/2) X_J with a second ``tl.dot``; the
   forward applies it to Z, the backward to l1 g (A^ is symmetric, so no transpose).

Three passes (the last two computing each tile and its transpose) of N^2 D work and O(N) memory (theta, degrees), instead of the dense
reference's N x N similarity, top-k and normalised graph (and the official code's two N^3
``diag_embed`` products). All fp32 with IEEE ``tl.dot``: theta compares values exactly, and TF32
rounding would move pixels across it.

Class graph (``class_propagate``) with the intended label-equality mask needs no kernel: P2 >= 0
makes it block-diagonal of rank C, so Q^ X is three O(N C D) torch ops
(``reference.class_graph_lowrank``), on the device, without host reads. The official scrambled
mask is not low-rank: it runs the dense reference (``accepts`` says so).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from semiseg_fast import reference as ref

_MAX_K = 64


def _block(k: int) -> int:
    # top-k buffer = tile width (the merge joins the two); tile height = width, so the transposed
    # tile of a row block is bit for bit the tile of a column block (see _graph_tile)
    return max(32, triton.next_power_of_2(k))


@triton.jit
def _sim_tile(f_ptr, offs_r, offs_n, offs_d, N, D):
    r_ok = offs_r < N
    n_ok = offs_n < N
    d_ok = offs_d < D
    fr = tl.load(f_ptr + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                 other=0.0)
    fn = tl.load(f_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                 other=0.0)
    s = tl.dot(fr, tl.trans(fn), input_precision="ieee")
    return tl.where(s < 0, 0.0, s), n_ok


@triton.jit
def _topk_kernel(f_ptr, theta_ptr, N, D, K, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_R, KP], -1.0, tl.float32)  # below any clamped similarity
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s, n_ok = _sim_tile(f_ptr, offs_r, offs_n, offs_d, N, D)
        s = tl.where(n_ok[None, :], s, -1.0)
        both = tl.reshape(tl.join(best, s), [BLOCK_R, 2 * KP])
        both = tl.sort(both, dim=1, descending=True)
        # keep the first KP: [R, 2, KP] -> [R, KP, 2] -> split off the upper half
        best, _ = tl.split(tl.permute(tl.reshape(both, [BLOCK_R, 2, KP]), (0, 2, 1)))
    pick = tl.arange(0, KP)[None, :] == (K - 1)
    theta = tl.sum(tl.where(pick, best, 0.0), axis=1)
    tl.store(theta_ptr + offs_r, theta, mask=offs_r < N)


@triton.jit
def _graph_tile(f_ptr, theta_ptr, offs_r, offs_n, offs_d, N, D):
    # S'_IJ and S'_JI each from the very tile the top-k pass of its rows computed (same shapes, same
    # operand order): theta_j is one of row j's values, so comparing a recomputed S_ij that differs
    # in the last bit would drop the k-th neighbour; A = S' + S'^T is then exactly symmetric
    s, n_ok = _sim_tile(f_ptr, offs_r, offs_n, offs_d, N, D)
    s_t, _ = _sim_tile(f_ptr, offs_n, offs_r, offs_d, N, D)
    s_t = tl.trans(s_t)
    th_r = tl.load(theta_ptr + offs_r, mask=offs_r < N, other=float("inf"))
    th_n = tl.load(theta_ptr + offs_n, mask=n_ok, other=float("inf"))
    a = tl.where(s >= th_r[:, None], s, 0.0) + tl.where(s_t >= th_n[None, :], s_t, 0.0)
    return tl.where((offs_r < N)[:, None] & n_ok[None, :], a, 0.0), n_ok


@triton.jit
def _degree_kernel(f_ptr, theta_ptr, deg_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    deg = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        a, _ = _graph_tile(f_ptr, theta_ptr, offs_r, offs_n, offs_d, N, D)
        deg += tl.sum(a, axis=1)
    tl.store(deg_ptr + offs_r, deg, mask=offs_r < N)


@triton.jit
def _apply_kernel(f_ptr, theta_ptr, dinv_ptr, x_ptr, out_ptr, N, D, CX,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_x = tl.arange(0, BLOCK_X)
    x_ok = offs_x < CX
    acc = tl.zeros([BLOCK_R, BLOCK_X], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        a, n_ok = _graph_tile(f_ptr, theta_ptr, offs_r, offs_n, offs_d, N, D)
        dn = tl.load(dinv_ptr + offs_n, mask=n_ok, other=0.0)
        xn = tl.load(x_ptr + offs_n.to(tl.int64)[:, None] * CX + offs_x[None, :], mask=n_ok[:, None] & x_ok[None, :],
                     other=0.0)
        acc += tl.dot(a * dn[None, :], xn, input_precision="ieee")
    dr = tl.load(dinv_ptr + offs_r, mask=offs_r < N, other=0.0)
    tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * CX + offs_x[None, :], acc * dr[:, None],
             mask=(offs_r < N)[:, None] & x_ok[None, :])


def _semantic_graph(F: torch.Tensor, k: int):
    """(unit features, theta, d^-1/2): all a graph application needs, O(N) beyond F."""
    n, d = F.shape
    f = F.float()
    f = (f / (f.norm(dim=1, keepdim=True) + 1e-9)).contiguous()
    theta = torch.empty(n, dtype=torch.float32, device=F.device)
    deg = torch.empty(n, dtype=torch.float32, device=F.device)
    blk = _block(k)
    grid = (triton.cdiv(n, blk),)
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16 on GPUs
    _topk_kernel[grid](f, theta, n, d, k, BLOCK_R=blk, BLOCK_N=blk, KP=blk, BLOCK_D=block_d)
    _degree_kernel[grid](f, theta, deg, n, d, BLOCK_R=blk, BLOCK_N=blk, BLOCK_D=block_d)
    return f, theta, torch.pow(deg + 1e-10, -0.5), blk


def _apply(graph, X: torch.Tensor) -> torch.Tensor:
    f, theta, dinv, blk = graph
    n, d = f.shape
    x = X.float().contiguous()
    out = torch.empty_like(x)
    # the same tile shape as the passes that made theta, so every S_ij is recomputed bit for bit
    _apply_kernel[(triton.cdiv(n, blk),)](f, theta, dinv, x, out, n, d, x.shape[1], BLOCK_R=blk,
                                          BLOCK_N=blk, BLOCK_D=max(16, triton.next_power_of_2(d)),
                                          BLOCK_X=max(triton.next_power_of_2(x.shape[1]), 16))
    return out


def _mix_weights(mask: torch.Tensor, dtype: torch.dtype):
    m = mask.to(dtype)[:, None]
    return 0.2 * m + 0.8 * (1 - m), 0.8 * m + 0.2 * (1 - m)


def graph_mix(Z, F, eta, k, threshold):
    z = Z.float()
    conf, y = torch.max(torch.softmax(z, dim=1), dim=1)
    mask = (conf >= threshold) | (conf >= eta[y])
    z_graph = _apply(_semantic_graph(F, k), z)
    m = mask.to(z.dtype)[:, None]
    # official operation order: (0.8 A^Z + 0.2 Z)(1 - m) + (0.2 A^Z + 0.8 Z) m
    mixed = (0.8 * z_graph + 0.2 * z) * (1 - m) + (0.2 * z_graph + 0.8 * z) * m
    return mixed.to(Z.dtype), y, mask


def graph_mix_backward(grad, F, mask, k):
    g = grad.float()
    l1, l2 = _mix_weights(mask, g.dtype)
    return (_apply(_semantic_graph(F, k), l1 * g) + l2 * g).to(grad.dtype)


def class_propagate(logits, y, F, official_layout, h, w):
    out = ref.class_graph_lowrank(torch.softmax(logits.float(), dim=1), y, F.float())
    return out.to(F.dtype)


def class_propagate_backward(grad, logits, y, official_layout, h, w):
    # Q^ is symmetric: the gradient is Q^ g
    return ref.class_graph_lowrank(torch.softmax(logits.float(), dim=1), y, grad.float()).to(grad.dtype)


def _small_k(Z, F, eta, k, *_):
    return k <= _MAX_K


def _small_k_backward(grad, F, mask, k):
    return k <= _MAX_K


def _intended_mask(logits, y, F, official_layout, *_):
    return not official_layout


def _intended_mask_backward(grad, logits, y, official_layout, *_):
    return not official_layout


graph_mix.accepts = _small_k
graph_mix_backward.accepts = _small_k_backward
class_propagate.accepts = _intended_mask
class_propagate_backward.accepts = _intended_mask_backward

LAUNCHERS = {"graph_mix": graph_mix, "graph_mix_backward": graph_mix_backward,
             "class_propagate": class_propagate, "class_propagate_backward": class_propagate_backward}
