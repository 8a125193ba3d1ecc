"""MLLC graph propagation without N x N matrices (kernels/graph.py) against the float64 reference.

CPU: Triton interpreter at small N; the ``gpu`` test runs the VOC graph size (41 x 41 = 1681 nodes).
"""
import pytest
import torch
from torch import nn

from semiseg_fast import ops
from semiseg_fast.ops import _dispatch

pytestmark = pytest.mark.skipif("graph_mix" not in _dispatch.KERNELS, reason="triton not importable")


def case(n=45, c=5, d=12, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = (torch.randn(n, c, generator=g) * 2).to(device)
    F = torch.randn(n, d, generator=g).to(device)
    eta = torch.rand(c, generator=g).to(device)
    return Z, F, eta


def _tol_check(fused, exact, low, floor):
    err = (fused.double() - exact).abs().max().item()
    base = (low.double() - exact).abs().max().item()
    assert err <= 2 * base + floor, (err, base)


def check_mix(Z, F, eta, k, threshold=0.8, floor=1e-6):
    g = torch.randn(Z.shape, generator=torch.Generator().manual_seed(1)).to(Z.device)
    outs = {}
    for name, dtype, impl in (("fused", torch.float32, "triton"), ("exact", torch.float64, "reference"),
                              ("low", torch.float32, "reference")):
        z = Z.to(dtype).clone().requires_grad_(True)
        mixed, y, m = ops.graph_mix(z, F.to(dtype), eta.to(dtype), k=k, threshold=threshold, impl=impl)
        outs[name] = (mixed, y, m, torch.autograd.grad(mixed, z, g.to(dtype))[0])
    for i in (0, 3):
        _tol_check(outs["fused"][i], outs["exact"][i], outs["low"][i], floor)
    assert torch.equal(outs["fused"][1], outs["exact"][1]) and torch.equal(outs["fused"][2], outs["exact"][2])
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


def test_class_propagate_intended_mask_and_reference_fallbacks():
    Z, F, _ = case(n=30, seed=4)
    y = torch.randint(0, Z.shape[1], (30,))
    g = torch.randn(30, F.shape[1])
    got = {}
    for impl, dtype in (("triton", torch.float32), ("reference", torch.float64), ("reference", torch.float32)):
        f = F.to(dtype).clone().requires_grad_(True)
        out = ops.class_propagate(Z.to(dtype), y, f, impl=impl)
        got[(impl, dtype)] = (out, torch.autograd.grad(out, f, g.to(dtype))[0])
    for i in range(2):
        _tol_check(got[("triton", torch.float32)][i], got[("reference", torch.float64)][i],
                   got[("reference", torch.float32)][i], 1e-6)
    # the official scrambled mask and k beyond the top-k buffer run the references under auto
    with pytest.raises(NotImplementedError, match="class_propagate"):
        ops.class_propagate(Z, y, F, official_layout=True, h=5, w=6, impl="triton")
    Zn, Fn, _ = case(n=70, seed=8)
    with pytest.raises(NotImplementedError, match="graph_mix"):
        ops.graph_mix(Zn, Fn, torch.zeros(Z.shape[1]), k=65, impl="triton")
    ops.class_propagate(Z, y, F, official_layout=True, h=5, w=6)
    ops.graph_mix(Zn, Fn, torch.zeros(Z.shape[1]), k=65)


def test_whole_layer_and_compile():
    Z, F, eta = case(n=4 * 5, c=4, d=8, seed=5)
    conv_z = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
    conv_f = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    ref_out = ops.graph_propagate(Z, F, eta, conv_z, conv_f, k=8, h=4, w=5, impl="reference")
    fused_out = ops.graph_propagate(Z, F, eta, conv_z, conv_f, k=8, h=4, w=5, impl="triton")
    for a, b in zip(ref_out, fused_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(lambda z, f: ops.graph_propagate(z, f, eta, conv_z, conv_f, k=8, h=4, w=5,
                                                              impl="triton"), fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(Z, F), fused_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.semiseg.graph_mix.default, (Z.requires_grad_(True), F, eta, 8, 0.9, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.gpu
def test_mllc_voc_graph_on_gpu_without_syncs():
    Z, F, eta = case(n=41 * 41, c=21, d=256, device="cuda", seed=6)
    check_mix(Z, F, eta, k=21, floor=1e-5)
    z = Z.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixed, y, m = ops.graph_mix(z, F, eta, k=21)
        mixed.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
