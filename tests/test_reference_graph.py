"""Reference MLLC graph layer against per-entry loops and the closed-form backward of spec 5b."""
import math

import pytest
import torch
from torch import nn

from semiseg_fast.reference import (
    class_graph,
    class_graph_lowrank,
    graph_propagate,
    graph_propagate_grad,
    official_dense_layer,
    official_onehot,
    semantic_graph,
)


def _unit_rows(X):
    return [[v / (math.sqrt(math.fsum(a * a for a in row)) + 1e-9) for v in row] for row in X]


def _sym_normalise(A):
    d = [(math.fsum(row) + 1e-10) ** -0.5 for row in A]
    n = len(A)
    return torch.tensor([[d[i] * A[i][j] * d[j] for j in range(n)] for i in range(n)],
                        dtype=torch.float64)


def brute_semantic_graph(F, k):
    U = _unit_rows(F.tolist())
    n = len(U)
    S = [[max(0.0, math.fsum(a * b for a, b in zip(U[i], U[j]))) for j in range(n)]
         for i in range(n)]
    kept = []
    for i in range(n):
        theta = sorted(S[i], reverse=True)[k - 1]  # k-th largest, with multiplicity
        kept.append([S[i][j] if S[i][j] >= theta else 0.0 for j in range(n)])
    return _sym_normalise([[kept[i][j] + kept[j][i] for j in range(n)] for i in range(n)])


def brute_official_onehot(y, C, h, w):
    """OH'[r, s] from the flat index arithmetic of reshape(permute([h, w, C] -> [w, C, h]))."""
    out = torch.zeros(h * w, C, dtype=torch.float64)
    for r in range(h * w):
        for s in range(C):
            flat = r * C + s
            col, rem = divmod(flat, C * h)  # position in [w, C, h]
            cls, row = divmod(rem, h)
            out[r, s] = float(int(y[row * w + col]) == cls)
    return out


def brute_class_graph(P2, y, official=False, h=None, w=None):
    U = _unit_rows(P2.tolist())
    n, C = P2.shape
    if official:
        OH = brute_official_onehot(y, C, h, w).tolist()
        same = [[math.fsum(a * b for a, b in zip(OH[i], OH[j])) != 0 for j in range(n)]
                for i in range(n)]
    else:
        same = [[int(y[i]) == int(y[j]) for j in range(n)] for i in range(n)]
    Q = [[max(0.0, math.fsum(a * b for a, b in zip(U[i], U[j]))) if same[i][j] else 0.0
          for j in range(n)] for i in range(n)]
    return _sym_normalise(Q)


def test_semantic_graph_matches_loops():
    F = torch.randn(23, 5, dtype=torch.float64)
    for k in (1, 4, 21, 23):
        got = semantic_graph(F, k)
        torch.testing.assert_close(got, brute_semantic_graph(F, k), rtol=1e-12, atol=1e-15)
        assert torch.equal(got, got.T)  # (d_i d_j) A_ij with A = S' + S'^T: exactly symmetric
    assert semantic_graph(F.float(), 4).dtype == torch.float32


def test_semantic_graph_ties_keep_every_entry_at_theta():
    # One-hot features give exact ties: each row has 6 equal similarities and zeros elsewhere.
    groups = torch.arange(18) % 3
    F = nn.functional.one_hot(groups, 4).double() * 2.5
    got = semantic_graph(F, 4)
    torch.testing.assert_close(got, brute_semantic_graph(F, 4), rtol=1e-12, atol=1e-15)
    assert torch.equal((got > 0).sum(1), torch.full((18,), 6))  # more than k = 4 kept
    assert torch.equal(got > 0, groups[:, None] == groups[None, :])


def test_semantic_graph_needs_k_nodes():
    with pytest.raises(ValueError, match="k"):
        semantic_graph(torch.randn(20, 3), 21)


def test_class_graph_intended_and_official_match_loops():
    h, w, C = 3, 5, 4
    P2 = torch.softmax(torch.randn(h * w, C, dtype=torch.float64) * 2, dim=1)
    y = torch.randint(0, C, (h * w,))
    intended = class_graph(P2, y)
    torch.testing.assert_close(intended, brute_class_graph(P2, y), rtol=1e-12, atol=1e-15)
    assert torch.equal(intended, intended.T)
    official = class_graph(P2, y, official_layout=True, h=h, w=w)
    assert torch.equal(official, official.T)
    torch.testing.assert_close(official, brute_class_graph(P2, y, True, h, w), rtol=1e-12,
                               atol=1e-15)
    assert not torch.allclose(official, intended)
    assert torch.equal(official_onehot(y, C, h, w).double(), brute_official_onehot(y, C, h, w))


def test_official_layout_is_identity_for_h1_but_not_for_w1():
    C = 3
    P2 = torch.softmax(torch.randn(7, C, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 2, 2, 1, 0, 1, 2])
    onehot = nn.functional.one_hot(y, C)
    assert torch.equal(official_onehot(y, C, 1, 7), onehot)
    torch.testing.assert_close(class_graph(P2, y, True, 1, 7), class_graph(P2, y), rtol=0, atol=0)
    # w = 1: reshape of the [C, h] transpose; it scrambles rows (and can zero some).
    assert not torch.equal(official_onehot(y, C, 7, 1), onehot)
    official = class_graph(P2, y, True, 7, 1)
    torch.testing.assert_close(official, brute_class_graph(P2, y, True, 7, 1), rtol=1e-12,
                               atol=1e-15)
    assert not torch.allclose(official, class_graph(P2, y))


def test_official_layout_needs_map_size():
    P2 = torch.softmax(torch.randn(6, 3), dim=1)
    with pytest.raises(ValueError, match="h, w"):
        class_graph(P2, torch.zeros(6, dtype=torch.int64), official_layout=True)
    with pytest.raises(ValueError, match="h, w"):
        class_graph(P2, torch.zeros(6, dtype=torch.int64), h=4, w=2)


def test_batched_onehot_and_lowrank_are_per_image():
    # [B, N, *]: every image its own graph (ops/graph.py runs MLLC's images as one batch)
    h, w, C = 3, 5, 4
    P2 = torch.softmax(torch.randn(3, h * w, C, dtype=torch.float64) * 3, dim=-1)
    y = torch.randint(0, C, (3, h * w))
    X = torch.randn(3, h * w, 6, dtype=torch.float64)
    onehot = official_onehot(y, C, h, w)
    got = class_graph_lowrank(P2, y, X)
    for i in range(3):
        assert torch.equal(onehot[i], official_onehot(y[i], C, h, w))
        torch.testing.assert_close(got[i], class_graph(P2[i], y[i]) @ X[i], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="P2, y, X"):
        class_graph_lowrank(P2, y[0], X)


def test_lowrank_class_graph_equals_dense():
    P2 = torch.softmax(torch.randn(29, 5, dtype=torch.float64) * 3, dim=1)
    y = torch.randint(0, 4, (29,))  # class 4 absent
    X = torch.randn(29, 6, dtype=torch.float64, requires_grad=True)
    got = class_graph_lowrank(P2, y, X)
    dense = class_graph(P2, y)
    torch.testing.assert_close(got, dense @ X, rtol=1e-12, atol=1e-14)
    g = torch.randn(29, 6, dtype=torch.float64)
    (dx,) = torch.autograd.grad(got, X, g)
    torch.testing.assert_close(dx, dense @ g, rtol=1e-12, atol=1e-14)


def _convs(C, D):
    conv_z = nn.Sequential(nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1)).double()
    conv_f = nn.Sequential(nn.Conv2d(D, D, 1), nn.ReLU(), nn.Conv2d(D, D, 1)).double()
    return conv_z, conv_f


def _nchw(x, h, w):
    return x.T.reshape(1, x.shape[1], h, w)


def _rows(x):
    return x.reshape(x.shape[1], -1).T


def brute_layer(Z, F, eta, conv_z, conv_f, k, official, h, w):
    """Layer from the loop-built graphs; returns outputs and the pieces of the closed form."""
    P = torch.softmax(Z, dim=1).tolist()
    conf = [max(r) for r in P]
    y = torch.tensor([r.index(max(r)) for r in P])  # first maximum
    m = torch.tensor([float(conf[i] >= 0.95 or conf[i] >= float(eta[y[i]]))
                      for i in range(len(P))], dtype=torch.float64)[:, None]
    a_hat = brute_semantic_graph(F, k)
    zt = a_hat @ Z
    z_mixed = m * (0.2 * zt + 0.8 * Z) + (1 - m) * (0.8 * zt + 0.2 * Z)
    z_out = _rows(conv_z(_nchw(z_mixed, h, w)))
    q_hat = brute_class_graph(torch.softmax(z_out, dim=1).detach(), y, official, h, w)
    f_graph = q_hat @ F
    f_out = _rows(conv_f(_nchw(f_graph, h, w)))
    return z_out, f_out, z_mixed, f_graph, a_hat, q_hat, m[:, 0]


@pytest.mark.parametrize("official", [False, True])
def test_graph_propagate_forward_and_closed_form_backward(official):
    h, w, C, D, k = 4, 7, 5, 6, 5
    Z = (torch.randn(h * w, C, dtype=torch.float64) * 3).requires_grad_(True)
    F = torch.randn(h * w, D, dtype=torch.float64).requires_grad_(True)
    eta = torch.tensor([0.9, 0.6, 0.99, 0.3, 0.0], dtype=torch.float64)
    conv_z, conv_f = _convs(C, D)
    z_out, f_out = graph_propagate(Z, F, eta, conv_z, conv_f, k=k, official_layout=official,
                                   h=h, w=w)
    z_b, f_b, z_mixed, f_graph, a_hat, q_hat, m = brute_layer(Z, F, eta, conv_z, conv_f, k,
                                                              official, h, w)
    assert 0 < int(m.sum()) < h * w  # both branches of the confidence mix are exercised
    torch.testing.assert_close(z_out, z_b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(f_out, f_b, rtol=1e-12, atol=1e-13)

    gz, gf = torch.randn_like(z_out), torch.randn_like(f_out)
    dZ, dF = torch.autograd.grad((z_out, f_out), (Z, F), (gz, gf))
    # g at Z' and F': pull the output gradients back through the convs only.
    zm = z_mixed.detach().requires_grad_(True)
    (g_z,) = torch.autograd.grad(_rows(conv_z(_nchw(zm, h, w))), zm, gz)
    fg = f_graph.detach().requires_grad_(True)
    (g_f,) = torch.autograd.grad(_rows(conv_f(_nchw(fg, h, w))), fg, gf)
    l1 = (0.2 * m + 0.8 * (1 - m))[:, None]
    l2 = (0.8 * m + 0.2 * (1 - m))[:, None]
    torch.testing.assert_close(dZ, a_hat @ (l1 * g_z) + l2 * g_z, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dF, q_hat @ g_f, rtol=1e-12, atol=1e-13)
    cz, cf = graph_propagate_grad(a_hat, q_hat, m.bool(), g_z, g_f)
    torch.testing.assert_close(dZ, cz, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dF, cf, rtol=1e-12, atol=1e-13)


def test_official_layout_changes_the_layer_output():
    h, w, C, D = 3, 5, 4, 3
    Z = torch.randn(h * w, C, dtype=torch.float64) * 3
    F = torch.randn(h * w, D, dtype=torch.float64)
    conv_z, conv_f = _convs(C, D)
    eta = torch.zeros(C, dtype=torch.float64)
    _, f_int = graph_propagate(Z, F, eta, conv_z, conv_f, k=4, h=h, w=w)
    _, f_off = graph_propagate(Z, F, eta, conv_z, conv_f, k=4, official_layout=True, h=h, w=w)
    assert not torch.allclose(f_int, f_off)
    # Without h, w the map is fed as [1, ch, N, 1], identical for 1x1 convs.
    z_a, f_a = graph_propagate(Z, F, eta, conv_z, conv_f, k=4)
    z_b, _ = graph_propagate(Z, F, eta, conv_z, conv_f, k=4, h=h, w=w)
    torch.testing.assert_close(z_a, z_b, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(f_a, f_int, rtol=1e-14, atol=1e-14)


def test_graph_propagate_gradcheck_z_branch():
    # Only Z -> Z'' is a plain function: F'' also depends on Z through the stop-gradient Q.
    h, w, C, D = 2, 3, 3, 2
    Z = (torch.randn(h * w, C, dtype=torch.float64) * 3).requires_grad_(True)
    F = torch.randn(h * w, D, dtype=torch.float64)
    conv_z, conv_f = _convs(C, D)
    eta = torch.full((C,), 0.7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: graph_propagate(z, F, eta, conv_z, conv_f, k=3, h=h, w=w)[0], (Z,))


@pytest.mark.parametrize("official", [False, True])
def test_official_dense_layer_equals_reference_layer(official):
    # The benchmark's official-style baseline (full sort, diag_embed products, no mirrored Gram)
    # must compute the reference's layer: outputs and both input gradients to float64 rounding
    # (the two differ only in the order of a few roundings, ~1e-16 relative per entry).
    h, w, C, D, k = 5, 7, 4, 6, 6
    Z = (torch.randn(h * w, C, dtype=torch.float64) * 3).requires_grad_(True)
    F = torch.randn(h * w, D, dtype=torch.float64).requires_grad_(True)
    eta = torch.tensor([0.9, 0.5, 0.99, 0.0], dtype=torch.float64)
    conv_z, conv_f = _convs(C, D)
    gz, gf = torch.randn(h * w, C, dtype=torch.float64), torch.randn(h * w, D, dtype=torch.float64)
    got, want = [], []
    for layer, out in ((official_dense_layer, got), (graph_propagate, want)):
        z_out, f_out = layer(Z, F, eta, conv_z, conv_f, k=k, official_layout=official, h=h, w=w)
        out.extend((z_out, f_out, *torch.autograd.grad((z_out, f_out), (Z, F), (gz, gf))))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="k"):
        official_dense_layer(Z[:5], F[:5], eta, conv_z, conv_f, k=6)
