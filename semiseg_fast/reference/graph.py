"""MLLC graph propagation, one image (spec/methods.md 5b, official ``G2Net.forward``).

Nodes are the N = h*w pixels in row-major order. Dense N x N matrices throughout: this is the
specification, not the O(N k) implementation.

Semantic graph (no gradient): F^ = F / (|F| + 1e-9), S = max(0, F^ F^^T), theta_i = k-th largest
entry of row i counted with multiplicity (the official ``sort(descending)[:, k-1]``), S'_ij = S_ij
if S_ij >= theta_i else 0, A = S' + S'^T, d = (rowsum A + 1e-10)^-1/2, A^ = (d_i d_j) A_ij
(exactly symmetric: the Gram matrices are mirrored from one triangle; Q^ is normalised alike).
Tie rule: every entry equal to theta_i is kept, so a row may keep more than k entries (ties at
the k-th value, including the case theta_i = 0, where the extra kept entries are zeros anyway).
The rule depends on values only, never on a sort order, so any exact top-k agrees with it.

Class graph (no gradient): P2^ = P2 / (|P2| + 1e-9), Q_ij = max(0, P2^_i . P2^_j) M_ij,
e = (rowsum Q + 1e-10)^-1/2, Q^ = e_i Q_ij e_j. M is label equality [y_i = y_j] by default
(the paper's intent); ``official_layout=True`` reproduces the official code's scrambled mask
M_ij = [cos(OH'_i, OH'_j) != 0] with OH' = reshape(permute(onehot(y)[h, w, C] -> [w, C, h]),
[N, C]). With h = 1 the scramble is the identity; with w = 1 (or general h, w) it is not.

Layer: (Z'', F'') = graph_propagate(Z, F, ...) with gradients to Z through A^ Z and to F through
Q^ F only; confidence mask, labels, S, A and Q are computed under no-grad as in the official code.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as nnf
from torch import Tensor

Conv = Callable[[Tensor], Tensor]


def _unit_rows(x: Tensor) -> Tensor:
    return x / (torch.norm(x, dim=-1, keepdim=True) + 1e-9)


def _clamped_gram(x_unit: Tensor) -> Tensor:
    gram = x_unit @ x_unit.T
    # A GEMM may round G_ij and G_ji differently; mirroring one triangle makes the graphs (and
    # hence A^ and Q^) exactly symmetric, which the transpose-free backward relies on.
    gram = torch.triu(gram) + torch.triu(gram, diagonal=1).T
    # Literal official ``dist[dist < 0] = 0`` (keeps NaN and -0.0 as they are).
    return torch.where(gram < 0, torch.zeros_like(gram), gram)


def _sym_normalise(adj: Tensor) -> Tensor:
    d = torch.pow(adj.sum(dim=1) + 1e-10, -0.5)
    # (d_i d_j) A_ij keeps the result bitwise symmetric, so the backward (which needs A^T) can
    # reuse A; the official diag-matmul pair rounds as (d_i A_ij) d_j, at most 1 ulp away.
    return (d[:, None] * d[None, :]) * adj


def semantic_graph(F: Tensor, k: int = 21) -> Tensor:
    """Normalised symmetric kNN graph ``A^`` float [N, N] (F's dtype, no gradient) of node
    features ``F`` float [N, D]."""
    if F.dim() != 2 or not F.is_floating_point():
        raise ValueError(f"F: expected floating [N, D], got {F.dtype} {tuple(F.shape)}")
    n = F.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n} nodes, got k={k}")
    with torch.no_grad():
        sim = _clamped_gram(_unit_rows(F.detach()))
        theta = torch.topk(sim, k, dim=1).values[:, k - 1 : k]
        kept = torch.where(sim < theta, torch.zeros_like(sim), sim)
        return _sym_normalise(kept + kept.T)


def official_onehot(y: Tensor, num_classes: int, h: int, w: int) -> Tensor:
    """The official code's scrambled one-hot ``OH'`` int64 [N, C] (permute [h, w, C] -> [w, C, h])
    of labels ``y`` int64 [N] (N = h w), or int64 [..., N, C] of ``y`` int64 [..., N], image by
    image."""
    onehot = nnf.one_hot(y.reshape(-1, h, w), num_classes)
    return onehot.permute(0, 2, 3, 1).reshape(*y.shape[:-1], h * w, num_classes)


def _check_layout(n: int, official_layout: bool, h: int | None, w: int | None) -> None:
    if (h is None) != (w is None):
        raise ValueError("h, w: give both or neither")
    if h is not None and h * w != n:
        raise ValueError(f"h, w: expected h * w = N = {n}, got {h} * {w}")
    if official_layout and h is None:
        raise ValueError("h, w: official_layout=True needs the map size h, w")


def class_graph(P2: Tensor, y: Tensor, official_layout: bool = False, h: int | None = None,
                w: int | None = None) -> Tensor:
    """Normalised class graph ``Q^`` float [N, N] (P2's dtype, no gradient) from probabilities
    ``P2`` float [N, C] and labels ``y`` int32 or int64 [N]."""
    if P2.dim() != 2 or not P2.is_floating_point():
        raise ValueError(f"P2: expected floating [N, C], got {P2.dtype} {tuple(P2.shape)}")
    n, c = P2.shape
    if y.shape != (n,) or y.dtype not in (torch.int32, torch.int64) or y.device != P2.device:
        raise ValueError(f"y: expected int64 [N] = [{n}] on {P2.device}, got {y.dtype} "
                         f"{tuple(y.shape)} on {y.device}")
    _check_layout(n, official_layout, h, w)
    with torch.no_grad():
        if official_layout:
            return class_graph_onehot(P2, official_onehot(y.long(), c, h, w))
        q = _clamped_gram(_unit_rows(P2.detach()))
        q = torch.where(y[:, None] == y[None, :], q, torch.zeros_like(q))
        return _sym_normalise(q)


def class_graph_onehot(P2: Tensor, onehot: Tensor) -> Tensor:
    """``Q^`` float [N, N] (P2's dtype, no gradient) of probabilities ``P2`` float [N, C] under the
    mask M_ij = [cos(OH_i, OH_j) != 0] of 0/1 rows ``onehot`` (any dtype) [N, C'].

    The official layout's graph with ``onehot`` = :func:`official_onehot`; the fused ops build the
    one-hot once for a whole batch and hand it to the reference and the kernel alike.
    """
    with torch.no_grad():
        q = _clamped_gram(_unit_rows(P2.detach()))
        oh = onehot.to(P2.dtype)
        q = torch.where(_clamped_gram(_unit_rows(oh)) == 0, torch.zeros_like(q), q)
        return _sym_normalise(q)


def class_graph_lowrank(P2: Tensor, y: Tensor, X: Tensor, num_labels: int | None = None) -> Tensor:
    """``Q^ X`` float [N, D] (X's dtype) for the intended (label-equality) mask, from
    probabilities ``P2`` float [N, C], labels ``y`` int32 or int64 [N] and ``X`` float [N, D], in
    O(N C^2 D) without any N x N matrix.

    P2 >= 0 makes the clamp inactive, so Q is block-diagonal with rank-C blocks:
    (Q^ X)_i = e_i P2^_i . sum_{j: y_j = y_i} P2^_j (e_j X_j)^T,
    e_i = (P2^_i . s_{y_i} + 1e-10)^-1/2 with s_c = sum_{j: y_j = c} P2^_j.
    With W [N, C*C], W_j = onehot(y_j) (x) P2^_j, both sums are GEMMs: blocks = W^T (e X) holds
    the C per-class [C, D] matrices and Q^ X = e W blocks; the largest intermediate is W, C^2 per
    node (a per-node gather of the blocks would be C D per node). Differentiable in X; P2 and y
    carry no gradient. Equal to ``class_graph(P2, y) @ X`` up to rounding (sums are regrouped).
    With a leading batch dimension ([B, N, C], [B, N], [B, N, D]) every image is its own graph.
    ``num_labels`` (default C): labels lie in [0, num_labels), which may exceed C.
    """
    if (P2.dim() not in (2, 3) or y.shape != P2.shape[:-1] or X.dim() != P2.dim()
            or X.shape[:-1] != P2.shape[:-1]):
        raise ValueError(f"P2, y, X: expected [N, C], [N], [N, D] or [B, N, C], [B, N], [B, N, D], got "
                         f"{tuple(P2.shape)}, {tuple(y.shape)}, {tuple(X.shape)}")
    c = P2.shape[-1]
    unit = _unit_rows(P2.detach())
    onehot = nnf.one_hot(y.long(), c if num_labels is None else num_labels).to(unit.dtype)
    weights = (onehot[..., :, None] * unit[..., None, :]).flatten(-2)  # [..., N, C * C]
    class_sums = weights.sum(dim=-2, keepdim=True)  # s_c, flattened [..., 1, C * C]
    e = torch.pow(weights @ class_sums.transpose(-1, -2) + 1e-10, -0.5)  # [..., N, 1]
    blocks = weights.transpose(-1, -2).to(X.dtype) @ (e * X)
    return e * (weights.to(X.dtype) @ blocks)


def confidence_mask(Z: Tensor, eta: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """``m`` bool [..., N] = [conf_i >= threshold or conf_i >= eta_{y_i}] and ``y`` int64 [..., N]
    (argmax of softmax(Z), first maximum on ties) of logits ``Z`` float [..., N, C] and per-class
    thresholds ``eta`` float [C] (compared as given)."""
    conf, y = torch.max(torch.softmax(Z, dim=-1), dim=-1)
    return (conf >= threshold) | (conf >= eta[y]), y


def mix(z: Tensor, z_graph: Tensor, mask: Tensor) -> Tensor:
    """Z' float [..., N, C] = m (0.2 A^Z + 0.8 Z) + (1 - m)(0.8 A^Z + 0.2 Z) of ``z`` float
    [..., N, C], ``z_graph`` = A^ Z (z's dtype) [..., N, C] and ``mask`` bool [..., N], in the
    official operation order (one rounding sequence for the reference and the fused op)."""
    m = mask.to(z.dtype)[..., None]
    return (0.8 * z_graph + 0.2 * z) * (1 - m) + (0.2 * z_graph + 0.8 * z) * m


def mix_weights(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The weights of :func:`mix` as Z' = l1 A^Z + l2 Z: ``l1``, ``l2`` ``dtype`` [..., N, 1] of
    ``mask`` bool [..., N], l1 = 0.2 m + 0.8 (1 - m), l2 = 0.8 m + 0.2 (1 - m); the backward's."""
    m = mask.to(dtype)[..., None]
    return 0.2 * m + 0.8 * (1 - m), 0.8 * m + 0.2 * (1 - m)


def _pointwise(conv: Conv, x: Tensor, h: int, w: int) -> Tensor:
    """Apply a 1x1-conv callable on NCHW [1, ch, h, w] to node rows x [N, ch]."""
    out = conv(x.T.reshape(1, x.shape[1], h, w))
    return out.reshape(out.shape[1], h * w).T


def graph_propagate(Z: Tensor, F: Tensor, eta: Tensor, conv_z: Conv, conv_f: Conv, k: int = 21,
                    official_layout: bool = False, h: int | None = None,
                    w: int | None = None, threshold: float = 0.95) -> tuple[Tensor, Tensor]:
    """One G2Net layer on one image: ``Z`` float [N, C] logits, ``F`` float [N, D] embeddings (Z's
    dtype), ``eta`` float [C] thresholds.

    conv_z / conv_f are callables on NCHW tensors [1, ch, h, w] (e.g. the official nn.Sequential
    of 1x1 convs); without h, w the map is passed as [1, ch, N, 1], which is the same for 1x1
    convs. Returns (``Z''`` [N, C'], ``F''`` [N, D']) in the dtype the convs give.
    """
    if Z.dim() != 2 or F.dim() != 2 or Z.shape[0] != F.shape[0]:
        raise ValueError(
            f"Z, F: expected [N, C] and [N, D], got {tuple(Z.shape)}, {tuple(F.shape)}")
    if F.dtype != Z.dtype or not Z.is_floating_point():
        raise ValueError(f"Z, F: expected one floating dtype, got {Z.dtype}, {F.dtype}")
    n, c = Z.shape
    if eta.shape != (c,) or eta.device != Z.device:
        raise ValueError(f"eta: expected [C] = [{c}] on {Z.device}, got {tuple(eta.shape)} "
                         f"on {eta.device}")
    _check_layout(n, official_layout, h, w)
    hh, ww = (n, 1) if h is None else (h, w)

    with torch.no_grad():
        mask, y = confidence_mask(Z.detach(), eta, threshold)
        a_hat = semantic_graph(F, k)
    z_out = _pointwise(conv_z, mix(Z, a_hat @ Z, mask), hh, ww)

    with torch.no_grad():
        q_hat = class_graph(torch.softmax(z_out.detach(), dim=1), y, official_layout, h, w)
    f_out = _pointwise(conv_f, q_hat @ F, hh, ww)
    return z_out, f_out


def _official_normalise(adj: Tensor) -> Tensor:
    # The official pair of dense diag_embed products, two N^3 GEMMs where (d_i d_j) A_ij suffices.
    diag = torch.diag_embed(torch.pow(adj.sum(dim=1) + 1e-10, -0.5))
    return diag @ adj @ diag


def official_dense_layer(Z: Tensor, F: Tensor, eta: Tensor, conv_z: Conv, conv_f: Conv, k: int = 21,
                         official_layout: bool = False, h: int | None = None, w: int | None = None,
                         threshold: float = 0.95) -> tuple[Tensor, Tensor]:
    """:func:`graph_propagate` computed the way the official ``G2Net.forward`` does, the baseline
    the benchmarks compare with: a full descending sort of the N x N similarity (values and int64
    indices) for theta, both graphs normalised by two dense ``diag_embed`` products (four N^3
    GEMMs per layer), the official mask as a dense N x N x C product of the one-hot rows, no
    mirrored Gram. Same arguments (``Z`` float [N, C], ``F`` float [N, D], ``eta`` float [C]) and
    outputs (``Z''`` [N, C'], ``F''`` [N, D']), the same math up to rounding (tested against it in
    float64); memory and time grow as N^2 and N^3.
    """
    n, c = Z.shape
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n} nodes, got k={k}")
    _check_layout(n, official_layout, h, w)
    hh, ww = (n, 1) if h is None else (h, w)
    with torch.no_grad():
        mask, y = confidence_mask(Z.detach(), eta, threshold)
        unit = _unit_rows(F.detach())
        sim = unit @ unit.T
        sim = torch.where(sim < 0, torch.zeros_like(sim), sim)
        ranked, _ = torch.sort(sim, dim=1, descending=True)  # the official code keeps the indices
        kept = torch.where(sim >= ranked[:, k - 1 : k], sim, torch.zeros_like(sim))
        a_hat = _official_normalise(kept + kept.T)
    z_out = _pointwise(conv_z, mix(Z, a_hat @ Z, mask), hh, ww)
    with torch.no_grad():
        p2 = _unit_rows(torch.softmax(z_out.detach(), dim=1))
        q = p2 @ p2.T
        q = torch.where(q < 0, torch.zeros_like(q), q)
        if official_layout:
            onehot = official_onehot(y, c, h, w).to(q.dtype)
        else:
            onehot = nnf.one_hot(y, c).to(q.dtype)
        q = torch.where(onehot @ onehot.T != 0, q, torch.zeros_like(q))
        q_hat = _official_normalise(q)
    return z_out, _pointwise(conv_f, q_hat @ F, hh, ww)


def graph_propagate_grad(a_hat: Tensor, q_hat: Tensor, mask: Tensor, grad_z_mixed: Tensor,
                         grad_f_graph: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form input gradients of the layer (spec 5b), given the graphs ``a_hat`` float [N, N]
    and ``q_hat`` float [N, N], the confidence ``mask`` bool [N] and the gradients
    ``grad_z_mixed`` float [N, C] at Z' (before conv_z) and ``grad_f_graph`` float [N, D] at F'
    (before conv_f): (dZ [N, C], dF [N, D]) with dZ = A^ (l1 g) + l2 g (l1, l2 of
    :func:`mix_weights`) and dF = Q^ g. Both graphs are symmetric, so no transpose is needed.
    """
    l1, l2 = mix_weights(mask, grad_z_mixed.dtype)
    return a_hat @ (l1 * grad_z_mixed) + l2 * grad_z_mixed, q_hat @ grad_f_graph


__all__ = [
    "class_graph",
    "class_graph_lowrank",
    "class_graph_onehot",
    "confidence_mask",
    "graph_propagate",
    "graph_propagate_grad",
    "mix",
    "mix_weights",
    "official_dense_layer",
    "official_onehot",
    "semantic_graph",
]
