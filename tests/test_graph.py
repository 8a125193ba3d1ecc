"""MLLC graph propagation without N x N matrices (kernels/graph.py) against the float64 reference.

CPU: Triton interpreter at small N; the ``gpu`` tests run real sizes (VOC 41 x 41 = 1681 nodes,
D = 256, C = 21, and a batch-wide graph of 16k nodes).
"""
import pytest
import torch
from torch import nn

from semiseg_fast import ops
from semiseg_fast import reference as ref
from semiseg_fast.ops import _dispatch

pytestmark = pytest.mark.skipif("graph_mix" not in _dispatch.KERNELS, reason="triton not importable")


def case(n=45, c=5, d=12, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = (torch.randn(n, c, generator=g) * 2).to(device)
    F = torch.randn(n, d, generator=g).to(device)
    eta = torch.rand(c, generator=g).to(device)
    return Z, F, eta


def _tol_check(fused, exact, low, floor, rows=None):
    if rows is not None:
        fused, exact, low = fused[rows], exact[rows], low[rows]
    err = (fused.double() - exact).abs().max().item()
    base = (low.double() - exact).abs().max().item()
    assert err <= 2 * base + floor, (err, base)


def _three_ways(run, *tensors):
    """``run(impl, *tensors)`` fused in fp32, reference in float64 and in fp32 (the tolerance base)."""
    return {name: run(impl, *(t.to(dtype) for t in tensors))
            for name, dtype, impl in (("fused", torch.float32, "triton"), ("exact", torch.float64, "reference"),
                                      ("low", torch.float32, "reference"))}


def check_mix(Z, F, eta, k, threshold=0.8, floor=1e-6, rows=None):
    g = torch.randn(Z.shape, generator=torch.Generator().manual_seed(1)).to(Z.device)

    def run(impl, z, f, e, g_):
        z = z.clone().requires_grad_(True)
        mixed, y, m = ops.graph_mix(z, f, e, k=k, threshold=threshold, impl=impl)
        return mixed, y, m, torch.autograd.grad(mixed, z, g_)[0]

    outs = _three_ways(run, Z, F, eta, g)
    for i in (0, 3):
        _tol_check(outs["fused"][i], outs["exact"][i], outs["low"][i], floor, rows)
    assert torch.equal(outs["fused"][1], outs["exact"][1]) and torch.equal(outs["fused"][2], outs["exact"][2])
    return outs["fused"]


def check_class(logits, y, F, official, h=None, w=None, floor=1e-6):
    g = torch.randn(F.shape, generator=torch.Generator().manual_seed(2)).to(F.device) * 1.5  # grad_output != 1

    def run(impl, lg, f, g_):
        f = f.clone().requires_grad_(True)
        out = ops.class_propagate(lg, y, f, official_layout=official, h=h, w=w, impl=impl)
        return out, torch.autograd.grad(out, f, g_)[0]

    outs = _three_ways(run, logits, F, g)
    for i in range(2):
        _tol_check(outs["fused"][i], outs["exact"][i], outs["low"][i], floor)
    return outs["fused"]


# k > 32 takes a 64-wide top-k buffer and 64 x 64 tiles (two row blocks here)
@pytest.mark.parametrize("n,k", [(45, 21), (7, 7), (33, 32), (40, 1), (70, 33)])
def test_graph_mix_matches_reference(n, k):
    check_mix(*case(n=n, seed=n + k), k=k)


def test_graph_mix_ties_at_theta_and_zero_features():
    Z, F, eta = case(n=40, seed=3)
    F[5:15] = F[4]  # eleven identical nodes: many equal similarities at theta
    F[20] = 0.0  # a zero feature: its similarities are 0
    check_mix(Z, F, eta, k=21)


def test_graph_mix_needs_k_nodes():
    Z, F, eta = case(n=20, seed=9)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= N = 20"):
        ops.graph_mix(Z, F, eta, k=21, impl="triton")


def test_backward_op_without_state_rebuilds_the_graph():
    # the forward hands its theta and degrees to the backward; called alone, the op rebuilds them
    Z, F, _ = case(n=30, seed=13)
    g = torch.randn(Z.shape, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(30, generator=torch.Generator().manual_seed(4)) < 0.5
    outs = _three_ways(lambda impl, g_, f: torch.ops.semiseg.graph_mix_backward(g_, f, mask, 7, impl), g, F)
    _tol_check(outs["fused"], outs["exact"], outs["low"], 1e-6)


def test_class_propagate_intended_mask():
    Z, F, _ = case(n=30, seed=4)
    y = torch.randint(0, Z.shape[1], (30,))
    y[y == 3] = 2  # an absent class
    check_class(Z, y, F, official=False)


# (7, 11): N = 77, odd, two 64-node tiles, the last partial; (9, 5, 40): C > 31, so the OH' rows
# take two mask words; (13, 1): w = 1 scrambles, many OH' rows empty
@pytest.mark.parametrize("h,w,c", [(7, 11, 5), (9, 5, 40), (13, 1, 4)])
def test_class_propagate_official_layout_streamed(h, w, c):
    n = h * w
    g = torch.Generator().manual_seed(h * w + c)
    logits = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    y[:3] = torch.tensor([c - 1, c - 2, c // 2])  # high classes present (the second word for C = 40)
    F = torch.randn(n, 6, generator=g)
    out, dF = check_class(logits, y, F, official=True, h=h, w=w)
    empty = ref.official_onehot(y, c, h, w).sum(1) == 0
    assert empty.any() and not empty.all()
    # nodes with an all-zero OH' row have no edge: F' and the gradient are exactly zero there
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(dF[empty], torch.zeros_like(dF[empty]))
    assert (out[~empty].abs().sum(1) > 0).all()


def _fused_with_grad(op, x, inputs, grad_seed=0, **kw):
    """A fused op's output on inputs(x) and the gradient of (output . G) in x, the same G [N, ch]
    for every image (drawn from grad_seed)."""
    x = x.clone().requires_grad_(True)
    out = op(*inputs(x), impl="triton", **kw)
    first = out[0] if isinstance(out, tuple) else out
    g = torch.randn(first.shape[-2:], generator=torch.Generator().manual_seed(grad_seed))
    return out, torch.autograd.grad(first, x, g.expand_as(first))[0]


def test_a_batch_of_graphs_is_each_image_on_its_own():
    # [B, N, *] inputs run every image's graph in one launch per pass (the grid's image axis): the
    # batch matches the float64 reference, and the kernels' results equal the one-graph calls bit
    # for bit; the intended class graph runs batched GEMMs, equal up to their summation order
    b, h, w, c = 2, 5, 7, 5
    g = torch.Generator().manual_seed(21)
    Z = torch.randn(b, h * w, c, generator=g) * 2
    F = torch.randn(b, h * w, 12, generator=g)
    F[1, 3:9] = F[1, 2]  # ties at theta in one image only
    eta = torch.rand(c, generator=g)
    y = check_mix(Z, F, eta, k=6)[1]
    (mixed, y_b, m), dz = _fused_with_grad(ops.graph_mix, Z, lambda z: (z, F, eta), k=6, threshold=0.8)
    for i in range(b):
        (one, y_i, m_i), dz_i = _fused_with_grad(ops.graph_mix, Z[i], lambda z: (z, F[i], eta), k=6, threshold=0.8)
        assert torch.equal(y_i, y_b[i]) and torch.equal(m_i, m[i])
        assert torch.equal(one, mixed[i]) and torch.equal(dz_i, dz[i])
    for official in (False, True):
        check_class(Z, y, F, official=official, h=h, w=w)
        out, df = _fused_with_grad(ops.class_propagate, F, lambda f: (Z, y, f), official_layout=official, h=h, w=w)
        for i in range(b):
            one, df_i = _fused_with_grad(ops.class_propagate, F[i], lambda f: (Z[i], y[i], f),
                                         official_layout=official, h=h, w=w)
            if official:
                assert torch.equal(one, out[i]) and torch.equal(df_i, df[i])
            else:
                torch.testing.assert_close(one, out[i], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(df_i, df[i], rtol=1e-5, atol=1e-6)


def test_official_layout_with_h1_is_the_intended_mask():
    # h = 1: the scramble is the identity, so the streamed kernel and the rank-C form agree
    Z, F, _ = case(n=37, seed=6)
    y = torch.randint(0, Z.shape[1], (37,))
    streamed = ops.class_propagate(Z, y, F, official_layout=True, h=1, w=37, impl="triton")
    lowrank = ops.class_propagate(Z, y, F, impl="triton")
    torch.testing.assert_close(streamed, lowrank, rtol=1e-5, atol=1e-6)  # two fp32 summation orders


def test_every_output_element_is_written(monkeypatch):
    # NaN-poisoned allocations: any element a kernel skipped would surface as NaN
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    Z, F, eta = case(n=35, c=3, d=20, seed=7)
    check_mix(Z, F, eta, k=5)
    y = torch.randint(0, 3, (35,))
    check_class(Z, y, F, official=True, h=5, w=7)


def test_large_k_runs_the_reference_under_auto():
    Zn, Fn, _ = case(n=70, seed=8)
    with pytest.raises(NotImplementedError, match="graph_mix"):
        ops.graph_mix(Zn, Fn, torch.zeros(Zn.shape[1]), k=65, impl="triton")
    ops.graph_mix(Zn, Fn, torch.zeros(Zn.shape[1]), k=65)


@pytest.mark.parametrize("official", [False, True])
def test_whole_layer_and_compile(official):
    Z, F, eta = case(n=4 * 5, c=4, d=8, seed=5)
    conv_z = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
    conv_f = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    kw = dict(k=8, official_layout=official, h=4, w=5)
    f_in = F.clone().requires_grad_(True)
    ref_out = ops.graph_propagate(Z, f_in, eta, conv_z, conv_f, impl="reference", **kw)
    fused_out = ops.graph_propagate(Z, f_in, eta, conv_z, conv_f, impl="triton", **kw)
    for a, b in zip(ref_out, fused_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(lambda z, f: ops.graph_propagate(z, f, eta, conv_z, conv_f, impl="triton", **kw),
                             fullgraph=True, backend="aot_eager")
    got = compiled(Z, f_in)
    for a, b in zip(got, fused_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (df,) = torch.autograd.grad(got[1].sum(), f_in)
    (df_ref,) = torch.autograd.grad(ref_out[1].sum(), f_in)
    torch.testing.assert_close(df, df_ref, rtol=1e-5, atol=1e-6)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.semiseg.graph_mix.default, (Z.requires_grad_(True), F, eta, 8, 0.9, "triton"),
                          test_utils=utils)
    y = torch.randint(0, 4, (20,))
    torch.library.opcheck(torch.ops.semiseg.class_propagate.default,
                          (Z.detach(), y, F.requires_grad_(True), official, 4, 5, "triton"), test_utils=utils)


def exact_case(n, c=21, d=256, device="cpu", seed=0):
    """Features of entries +-2^25 / sqrt(D) (D a power of 4): every row has norm 2^25, so the + 1e-9
    of the normalisation rounds away in fp32 and fp64 alike, the unit rows are +-1 / sqrt(D), and
    each similarity is a multiple of 2 / D that fp32 forms exactly in any summation order. Fused and
    reference kNN graphs are then the same set in every precision, with many exact ties at theta,
    and the outputs differ only by the roundings of degrees and sums. (With Gaussian features, some
    of 16k rows have a neighbour within fp32 rounding of theta, which no fp32 implementation decides
    as float64 does: at VOC size ~13% of the nodes have a similarity within 4e-5, about the fp32
    error bound of a 256-term unit dot, of a threshold it meets.)"""
    Z, F, eta = case(n=n, c=c, d=d, device=device, seed=seed)
    return Z, torch.where(F < 0, -1.0, 1.0) * 2.0**25 / d**0.5, eta


def test_graph_mix_exact_similarities_with_many_ties():
    # the real-size GPU tests' inputs at interpreter size: rows keep more than k on ties
    Z, F, eta = exact_case(40, c=5, d=16, seed=12)
    check_mix(Z, F, eta, k=9)


# -- GPU, real sizes -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_mllc_voc_graph_on_gpu_without_syncs():
    # MLLC at VOC: a batch of 10 per-image graphs of 41 x 41 nodes, one launch per pass
    images = [exact_case(41 * 41, device="cuda", seed=6 + i) for i in range(10)]
    Z, F = (torch.stack([im[j] for im in images]) for j in range(2))
    eta = images[0][2]
    # floor 1e-5: |Z| ~ 2 and fp32 sums over ~25 neighbours (ties included)
    check_mix(Z, F, eta, k=21, floor=1e-5)
    z = Z.clone().requires_grad_(True)
    f = F.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixed, y, m = ops.graph_mix(z, F, eta, k=21)
        mixed.sum().backward()
        for official in (False, True):
            ops.class_propagate(Z, y, f, official_layout=official, h=41, w=41).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("official", [False, True])
def test_class_graph_voc_on_gpu(official):
    # no threshold acts on Q, so Gaussian features are fine; floor 1e-5 for fp32 sums over the ~80
    # nodes of a class with |F| ~ 1 per entry
    Z, F, _ = case(n=41 * 41, c=21, d=256, device="cuda", seed=10)
    y = torch.randint(0, 21, (41 * 41,), device="cuda")
    check_class(Z, y, F, official=official, h=41, w=41, floor=1e-5)


@pytest.mark.gpu
def test_batch_graph_16k_on_gpu():
    # one graph over a batch of 4 images at 64 x 64 (N = 16384), forward and backward of both
    # halves; floors as at VOC (the class sums run over ~800 nodes, still well inside 1e-5 at fp32)
    Z, F, eta = exact_case(16384, device="cuda", seed=11)
    check_mix(Z, F, eta, k=21, floor=1e-5)
    y = torch.randint(0, 21, (16384,), device="cuda")
    check_class(Z, y, torch.randn_like(F), official=False, floor=1e-5)
