"""Public ops (semiseg_fast.ops) against the references: values and gradients in float64,
torch.library.opcheck, torch.compile(fullgraph=True) with backward, the impl switch, the
reduced-precision policy and the argument checks. Shapes stay tiny: the CPU suite is shared.
"""
import math
import types

import numpy as np
import pytest
import torch
from torch import nn

from semiseg_fast import ops
from semiseg_fast import reference as R
from semiseg_fast.ops import _dispatch

F64 = torch.float64


def _close(a, b, atol=1e-12, rtol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# Small cases, one per op (float64 unless asked otherwise)
# ------------------------------------------------------------------------------------------------

def kl_case(dtype=F64, B=3, C=4, H=5, W=3):
    p = torch.randn(B, C, H, W, dtype=F64) * 3
    q = torch.randn(B, C, H, W, dtype=F64)
    ignore = torch.rand(B, H, W) < 0.2
    ignore[1] = True  # a degenerate image: empty confident set, contributes 0
    return p.to(dtype), q.to(dtype).requires_grad_(), ignore


def sampled_case(dtype=F64, N=11, D=5, K=3, M=4, Q=6, Nneg=3):
    anchors = torch.randn(N, D, dtype=F64).to(dtype).requires_grad_()
    keys_pos = torch.randn(K, D, dtype=F64).to(dtype)
    bank = torch.randn(K * Q, D, dtype=F64).to(dtype)  # K queues of Q rows, flattened
    anchor_idx = torch.randint(0, N, (K, M))
    anchor_idx[0, :2] = 3  # duplicates add their gradients
    neg_idx = torch.randint(0, Q, (K, M, Nneg)) + Q * torch.arange(K).view(K, 1, 1)
    return anchors, keys_pos, bank, anchor_idx, neg_idx


def bank_case(dtype=F64, N=10, D=5, C=3, Q=4, lc=False):
    z = torch.randn(N, D, dtype=F64).to(dtype).requires_grad_()
    labels = torch.tensor([0, 1, 2, -1, 0, 1, 0, 2, -1, 1])[:N]
    bank = nn.functional.normalize(torch.randn(C, 2 * Q if lc else Q, D, dtype=F64), dim=2)
    positive = torch.randn(N, D, dtype=F64).to(dtype).requires_grad_() if lc else None
    return z, labels, bank.to(dtype), positive


def graph_case(dtype=F64, h=3, w=4, C=3, D=5):
    n = h * w
    Z = (torch.randn(n, C, dtype=F64) * 3).to(dtype).requires_grad_()
    F = torch.randn(n, D, dtype=F64).to(dtype).requires_grad_()
    eta = torch.full((C,), 0.7, dtype=F64)
    conv_z = nn.Sequential(nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1)).to(dtype)
    conv_f = nn.Sequential(nn.Conv2d(D, D, 1), nn.ReLU(), nn.Conv2d(D, D, 1)).to(dtype)
    return Z, F, eta, conv_z, conv_f


# ------------------------------------------------------------------------------------------------
# Equality with the references (float64, grad_output != 1)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_spatial_kl_matches_reference(reduction):
    p, q, ignore = kl_case()
    out = ops.spatial_kl(p, q, 2.0, 0.4, ignore, reduction)
    expected = R.spatial_kl(p, q, 2.0, 0.4, ignore, reduction)
    _close(out, expected)
    assert out.shape == expected.shape and out.dtype == F64
    go = torch.randn_like(out) + 2
    (grad,) = torch.autograd.grad(out, q, go)
    _close(grad, R.spatial_kl_grad(p, q, 2.0, 0.4, ignore, reduction, grad_output=go))
    (autograd_grad,) = torch.autograd.grad(expected, q, go)
    _close(grad, autograd_grad)
    assert grad[1].abs().max() == 0  # the degenerate image


def test_spatial_kl_strided_inputs_and_no_teacher_grad():
    p, q, _ = kl_case()
    p = p.detach().requires_grad_()
    q_t = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert not q_t.is_contiguous()
    out = ops.spatial_kl(p, q_t, tau=0.3)
    _close(out, R.spatial_kl(p, q_t, tau=0.3))
    out.backward()
    assert p.grad is None and q_t.grad.shape == q_t.shape


def test_entropy_percentile_matches_reference_and_numpy():
    logits = torch.randn(2, 5, 4, 3, dtype=F64) * 2
    valid = torch.rand(2, 4, 3) > 0.3
    qs = [0.0, 12.5, 50, 80.0, 100]
    ent, thresholds = ops.entropy_percentile(logits, qs, valid)
    _close(ent, R.entropy(logits), atol=0, rtol=0)
    expected = R.percentile(R.entropy(logits), qs, valid)
    assert torch.equal(thresholds, expected)
    selected = ent[valid].numpy()
    assert thresholds.tolist() == [np.percentile(selected, q) for q in qs]
    ent_all, t_scalar = ops.entropy_percentile(logits, 37.5)
    assert t_scalar.dim() == 0 and t_scalar == R.percentile(ent_all, 37.5)


def test_percentile_and_rank_mask_match_reference():
    values = torch.randn(4, 7, dtype=F64)
    valid = torch.rand(4, 7) > 0.5
    assert torch.equal(ops.percentile(values, [5, 50, 95], valid),
                       R.percentile(values, [5, 50, 95], valid))
    assert ops.percentile(values, 30).dim() == 0
    assert ops.percentile(values, torch.tensor([20.0, 70.0])).shape == (2,)
    prob = torch.softmax(torch.randn(2, 6, 3, 4, dtype=F64), dim=1)
    prob[0, :3, 0, 0] = 0.0  # ties: the lower class index ranks first
    for low, high in [(3, 20), (1, 4), (0, 1)]:
        got, want = ops.rank_mask(prob, low, high), R.rank_mask(prob, low, high)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_percentile_empty_and_nan_are_defined():
    values = torch.randn(3, 4, dtype=F64)
    none = torch.zeros(3, 4, dtype=torch.bool)
    assert torch.equal(ops.percentile(values, [10, 90], none), torch.zeros(2, dtype=F64))
    logits = torch.randn(3, 2, 1, 4, dtype=F64)
    _, thresholds = ops.entropy_percentile(logits, [10, 90], none[:, None])
    assert torch.equal(thresholds, torch.zeros(2, dtype=F64))
    values[0, 0] = math.nan
    assert torch.isnan(ops.percentile(values, [10, 90])).all()
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[0, 0] = False  # a NaN outside the selection takes no part
    _close(ops.percentile(values, 50, valid), R.percentile(values, 50, valid))


@pytest.mark.parametrize("num_valid", [None, 2.0, "tensor"])
def test_sampled_contrast_matches_reference(num_valid):
    anchors, keys_pos, bank, anchor_idx, neg_idx = sampled_case()
    active = torch.tensor([True, False, True])
    nv = torch.tensor(2.0, dtype=F64) if num_valid == "tensor" else num_valid
    ref_nv = 2.0 if num_valid == "tensor" else num_valid
    out = ops.sampled_contrast(anchors, keys_pos, bank, anchor_idx, neg_idx, 0.7,
                               num_valid=nv, active=active)
    expected = R.sampled_contrast(anchors, keys_pos, bank, anchor_idx, neg_idx, 0.7,
                                  num_valid=ref_nv, active=active)
    _close(out, expected)
    (grad,) = torch.autograd.grad(out, anchors, torch.tensor(1.7, dtype=F64))
    _close(grad, R.sampled_contrast_grad(anchors, keys_pos, bank, anchor_idx, neg_idx, 0.7,
                                         num_valid=ref_nv, active=active,
                                         grad_output=torch.tensor(1.7, dtype=F64)))


def test_sampled_contrast_empty_cases_are_zero():
    anchors, keys_pos, bank, anchor_idx, neg_idx = sampled_case()
    for k, m in [(0, 4), (3, 0)]:
        out = ops.sampled_contrast(anchors, keys_pos[:k], bank, anchor_idx[:k, :m],
                                   neg_idx[:k, :m])
        (grad,) = torch.autograd.grad(out, anchors)
        assert out == 0 and torch.equal(grad, torch.zeros_like(anchors))


@pytest.mark.parametrize("eps", [1e-12, 0.05])
@pytest.mark.parametrize("mode", ["hc", "lc"])
def test_class_bank_contrast_matches_reference(mode, eps):
    """The backward is a closed form derived in ops.contrast: against autograd through the
    reference, with eps large enough to matter, a class with fill 0 and a one-class bank."""
    lc = mode == "lc"
    z, labels, bank, positive = bank_case(lc=lc)
    go = torch.tensor(0.6, dtype=F64)
    for bank_k, fill in [(bank, torch.tensor([bank.shape[1], 2, 0])), (bank[:1], None)]:
        lab = labels if fill is not None else labels.clamp(max=0)
        if lc:
            out = ops.class_bank_contrast(z, lab, bank_k, "lc", positive=positive, fill=fill,
                                          eps=eps, detach_positive=False)
            expected = R.class_bank_contrast_lc(z, lab, positive, bank_k, eps=eps, fill=fill,
                                                detach_positive=False)
        else:
            out = ops.class_bank_contrast(z, lab, bank_k, "hc", temperature=0.2, eps=eps,
                                          fill=fill)
            expected = R.class_bank_contrast_hc(z, lab, bank_k, 0.2, eps=eps, fill=fill)
        _close(out, expected)
        inputs = (z, positive) if lc else (z,)
        for got, want in zip(torch.autograd.grad(out, inputs, go),
                             torch.autograd.grad(expected, inputs, go)):
            _close(got, want)


def test_class_bank_contrast_detached_positive_and_no_anchor():
    z, labels, bank, positive = bank_case(lc=True)
    out = ops.class_bank_contrast(z, labels, bank, "lc", positive=positive)
    out.backward()
    assert positive.grad is None and z.grad.abs().sum() > 0
    z2 = z.detach().requires_grad_()
    none = torch.full_like(labels, -1)
    out = ops.class_bank_contrast(z2, none, bank[:, :4], "hc")
    out.backward()
    assert out == 0 and torch.equal(z2.grad, torch.zeros_like(z2))


@pytest.mark.parametrize("official_layout", [False, True])
def test_graph_propagate_matches_reference(official_layout):
    Z, F, eta, conv_z, conv_f = graph_case()
    kw = {"k": 4, "official_layout": official_layout, "h": 3, "w": 4, "threshold": 0.9}
    out = ops.graph_propagate(Z, F, eta, conv_z, conv_f, **kw)
    expected = R.graph_propagate(Z, F, eta, conv_z, conv_f, **kw)
    for got, want in zip(out, expected):
        _close(got, want)
    params = [Z, F, *conv_z.parameters(), *conv_f.parameters()]
    gouts = [torch.randn_like(t) for t in out]
    for got, want in zip(torch.autograd.grad(out, params, gouts),
                         torch.autograd.grad(expected, params, gouts)):
        _close(got, want)


def test_graph_halves_use_the_closed_form():
    Z, F, eta, _, _ = graph_case()
    mixed, y, mask = ops.graph_mix(Z, F, eta, k=4, threshold=0.9)
    assert 0 < int(mask.sum()) < mask.numel()  # both branches of the mix are exercised
    g = torch.randn_like(mixed)
    (dz,) = torch.autograd.grad(mixed, Z, g)
    logits = torch.randn(Z.shape, dtype=F64)
    f_graph = ops.class_propagate(logits, y, F)
    gf = torch.randn_like(f_graph)
    (df,) = torch.autograd.grad(f_graph, F, gf)
    a_hat = R.semantic_graph(F, 4)
    q_hat = R.class_graph(torch.softmax(logits, dim=1), y)
    want_dz, want_df = R.graph_propagate_grad(a_hat, q_hat, mask, g, gf)
    _close(dz, want_dz)
    _close(df, want_df)


# ------------------------------------------------------------------------------------------------
# Reduced precision: computed in float32, returned in the natural dtype
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_dtypes(dtype):
    loose = dtype != torch.float32
    tol = {"atol": 2e-2, "rtol": 2e-2} if loose else {"atol": 1e-5, "rtol": 1e-5}
    p, q, ignore = kl_case(dtype)
    loss = ops.spatial_kl(p, q, 2.0, 0.4, ignore)
    loss.backward()
    assert loss.dtype == dtype and q.grad.dtype == dtype
    _close(loss.double(), R.spatial_kl(p.double(), q.double(), 2.0, 0.4, ignore), **tol)

    logits = torch.randn(2, 4, 3, 3).to(dtype)
    ent, thresholds = ops.entropy_percentile(logits, [20, 80])
    stat = torch.float32 if dtype != torch.float32 else dtype
    assert ent.dtype == stat and thresholds.dtype == stat
    assert ops.percentile(logits, 50).dtype == dtype
    assert ops.rank_mask(logits)[0].dtype == torch.bool

    anchors, keys_pos, bank, anchor_idx, neg_idx = sampled_case(dtype)
    loss = ops.sampled_contrast(anchors, keys_pos, bank, anchor_idx, neg_idx)
    loss.backward()
    assert loss.dtype == dtype and anchors.grad.dtype == dtype

    z, labels, bank, positive = bank_case(dtype, lc=True)
    loss = ops.class_bank_contrast(z, labels, bank, "lc", positive=positive,
                                   detach_positive=False)
    loss.backward()
    assert loss.dtype == dtype and z.grad.dtype == dtype and positive.grad.dtype == dtype
    expected = R.class_bank_contrast_lc(z.double(), labels, positive.double(), bank.double())
    _close(loss.double(), expected, **tol)

    Z, F, eta, conv_z, conv_f = graph_case(dtype)
    z_out, f_out = ops.graph_propagate(Z, F, eta.to(dtype), conv_z, conv_f, k=4)
    (z_out.sum() + f_out.sum()).backward()
    assert z_out.dtype == f_out.dtype == Z.grad.dtype == F.grad.dtype == dtype


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) on the raw ops
# ------------------------------------------------------------------------------------------------

def _opcheck_cases():
    p, q, ignore = kl_case(B=2, H=3, W=3)
    anchors, keys_pos, bank, anchor_idx, neg_idx = sampled_case()
    z, labels, cbank, positive = bank_case(lc=True)
    Z, F, eta, _, _ = graph_case()
    logits = torch.randn(2, 4, 3, 3, dtype=F64)
    valid = torch.rand(2, 3, 3) > 0.3
    y = torch.randint(0, 3, (Z.shape[0],))
    s = torch.ops.semiseg
    return {
        "spatial_kl": (s.spatial_kl, (p, q, 2.0, 0.4, ignore, "none", "reference")),
        "entropy_percentile": (s.entropy_percentile, (logits, [10.0, 90.0], valid, "auto")),
        "percentile": (s.percentile, (logits, [25.0], None, "reference")),
        "rank_mask": (s.rank_mask, (logits, 1, 3, "reference")),
        "sampled_contrast": (s.sampled_contrast, (anchors, keys_pos, bank, anchor_idx,
                                                  neg_idx, 0.5, None, "reference")),
        "class_bank_contrast": (s.class_bank_contrast, (z, labels, cbank, positive, None, "lc",
                                                        0.5, 1e-12, "reference")),
        "graph_mix": (s.graph_mix, (Z, F.detach(), eta, 4, 0.9, "reference")),
        "class_propagate": (s.class_propagate, (Z.detach(), y, F, True, 3, 4, "reference")),
        "graph_mix_batch": (s.graph_mix, (Z.expand(2, -1, -1).contiguous(), F.detach().expand(2, -1, -1).contiguous(),
                                          eta, 4, 0.9, "reference")),
        "class_propagate_batch": (s.class_propagate, (Z.detach().expand(2, -1, -1).contiguous(), y.expand(2, -1),
                                                      F.expand(2, -1, -1).contiguous(), True, 3, 4, "reference")),
        # The backward ops on their own (no double backward: plain inputs).
        "spatial_kl_backward": (s.spatial_kl_backward, (
            torch.randn(2, dtype=F64), p, q.detach(), torch.zeros(2, 2, p.shape[1]), torch.ones(2), 2.0, 0.4,
            ignore, "none", "reference")),
        "sampled_contrast_backward": (s.sampled_contrast_backward, (
            torch.tensor(0.3, dtype=F64), anchors.detach(), keys_pos, bank, anchor_idx, neg_idx,
            0.5, None, "reference")),
        "class_bank_contrast_backward": (s.class_bank_contrast_backward, (
            torch.tensor(0.3, dtype=F64), z.detach(), labels, cbank, positive.detach(), None,
            "lc", 0.5, 1e-12, True, "reference")),
        "graph_mix_backward": (s.graph_mix_backward, (
            torch.randn(Z.shape, dtype=F64), F.detach(), y > 0, 4, "reference")),
        "class_propagate_backward": (s.class_propagate_backward, (
            torch.randn(F.shape, dtype=F64), Z.detach(), y, False, None, None, "reference")),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) through each op, with backward
# ------------------------------------------------------------------------------------------------

def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_compile_differentiable_ops_with_backward():
    p, q, ignore = kl_case()
    anchors, keys_pos, bank, anchor_idx, neg_idx = sampled_case()
    z, labels, cbank, _ = bank_case()
    Z, F, eta, conv_z, conv_f = graph_case()

    def step(p, q, anchors, z, Z, F):
        kl = ops.spatial_kl(p, q, 2.0, 0.4, ignore)
        sc = ops.sampled_contrast(anchors, keys_pos, bank, anchor_idx, neg_idx)
        hc = ops.class_bank_contrast(z, labels, cbank, "hc")
        z_out, f_out = ops.graph_propagate(Z, F, eta, conv_z, conv_f, k=4)
        return kl + sc + hc + (z_out * f_out[:, :3]).sum()

    compiled = _compile(step)
    leaves = (q, anchors, z, Z, F)
    got = torch.autograd.grad(compiled(p, q, anchors, z, Z, F), leaves)
    want = torch.autograd.grad(step(p, q, anchors, z, Z, F), leaves)
    for a, b in zip(got, want):
        _close(a, b)


def test_compile_statistics_ops():
    logits = torch.randn(2, 4, 3, 3, dtype=F64)
    valid = torch.rand(2, 3, 3) > 0.3

    def stats(logits):
        ent, thresholds = ops.entropy_percentile(logits, [20.0, 80.0], valid)
        unl, lab = ops.rank_mask(torch.softmax(logits, dim=1), 1, 3)
        drop = ent >= ops.percentile(ent, 50.0, valid)
        return (ent <= thresholds[0]) & drop, unl | lab

    got, want = _compile(stats)(logits), stats(logits)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------------------------------------
# The impl switch: argument, context manager, environment variable, kernel registry
# ------------------------------------------------------------------------------------------------

def _every_entry():
    """One call per public entry, taking impl=..."""
    p, q, _ = kl_case()
    anchors, keys_pos, bank, anchor_idx, neg_idx = sampled_case()
    z, labels, cbank, _ = bank_case()
    Z, F, eta, conv_z, conv_f = graph_case()
    logits = torch.randn(1, 3, 2, 2, dtype=F64)
    return {
        "spatial_kl": lambda **kw: ops.spatial_kl(p, q, **kw),
        "entropy_percentile": lambda **kw: ops.entropy_percentile(logits, 50, **kw),
        "percentile": lambda **kw: ops.percentile(logits, 50, **kw),
        "rank_mask": lambda **kw: ops.rank_mask(logits, 1, 2, **kw),
        "sampled_contrast": lambda **kw: ops.sampled_contrast(anchors, keys_pos, bank,
                                                              anchor_idx, neg_idx, **kw),
        "class_bank_contrast": lambda **kw: ops.class_bank_contrast(z, labels, cbank, **kw),
        "graph_mix": lambda **kw: ops.graph_propagate(Z, F, eta, conv_z, conv_f, k=4, **kw),
    }


@pytest.mark.parametrize("how", ["argument", "context", "env"])
def test_triton_without_kernel_raises_naming_the_op(how, monkeypatch):
    monkeypatch.setattr(_dispatch, "KERNELS", {})  # a kernel module registering nothing
    for name, call in _every_entry().items():
        with pytest.raises(NotImplementedError, match=rf"semiseg::{name}\b.*registers no"):
            if how == "argument":
                call(impl="triton")
            elif how == "context":
                with ops.use_impl("triton"):
                    call()
            else:
                monkeypatch.setenv("SEMISEG_IMPL", "triton")
                call()
        monkeypatch.delenv("SEMISEG_IMPL", raising=False)
        call(impl="reference")
        call(impl="auto")


def test_switch_precedence_and_bad_values(monkeypatch):
    assert ops.requested_mode() == "auto"
    monkeypatch.setenv("SEMISEG_IMPL", "triton")
    assert ops.requested_mode() == "triton"
    with ops.use_impl("reference"):
        assert ops.requested_mode() == "reference"  # context beats env
        assert ops.requested_mode("auto") == "auto"  # argument beats context
        with ops.use_impl("auto"):
            assert ops.requested_mode() == "auto"
        assert ops.requested_mode() == "reference"
    monkeypatch.setenv("SEMISEG_IMPL", "cuda")
    with pytest.raises(ValueError, match="SEMISEG_IMPL"):
        ops.requested_mode()
    with pytest.raises(ValueError, match="impl"):
        ops.spatial_kl(*kl_case()[:2], impl="fast")
    with pytest.raises(ValueError, match="use_impl"), ops.use_impl("fused"):
        pass


def test_registered_kernel_is_dispatched(monkeypatch):
    p, q, _ = kl_case()
    calls = []

    def fake_kernel(p, q, temperature, tau, ignore):
        # per-image statistics (lse, kl, |Omega|): the op makes the loss of them, here 42
        calls.append(p.is_contiguous())
        b, c = p.shape[:2]
        return torch.zeros(b, 2, c), torch.full((b, c), 42.0 * math.log(3)), torch.full((b,), 3)

    monkeypatch.setattr(_dispatch, "KERNELS", {})
    monkeypatch.setitem(_dispatch.KERNELS, "spatial_kl", fake_kernel)
    assert ops.spatial_kl(p, q, impl="reference") != 42  # forced reference
    assert ops.spatial_kl(p, q) != 42  # auto: CPU tensors run the reference
    with pytest.raises(NotImplementedError, match="semiseg::spatial_kl_backward"):
        ops.spatial_kl(p, q, impl="triton")  # the backward kernel is missing
    monkeypatch.setitem(_dispatch.KERNELS, "spatial_kl_backward", lambda *a: torch.zeros(1))
    p_strided = p.transpose(2, 3).contiguous().transpose(2, 3)
    assert float(ops.spatial_kl(p_strided, q, impl="triton")) == pytest.approx(42.0)
    assert calls == [True]  # launchers get contiguous tensors


def test_compiled_graph_follows_use_impl_and_env_at_import(monkeypatch):
    monkeypatch.setattr(_dispatch, "KERNELS", {})  # "triton" must fail for this to be visible
    p, q, _ = kl_case()
    compiled = _compile(lambda p, q: ops.spatial_kl(p, q))
    compiled(p, q)
    monkeypatch.setenv("SEMISEG_IMPL", "triton")  # after import: eager only
    compiled(p, q)
    monkeypatch.setattr(_dispatch, "_ENV_AT_IMPORT", "triton")
    with pytest.raises(RuntimeError, match="semiseg::spatial_kl"):
        compiled(p, q)
    monkeypatch.setattr(_dispatch, "_ENV_AT_IMPORT", "")
    monkeypatch.delenv("SEMISEG_IMPL")
    # The global is guarded, so the call re-traces and the check fires (dynamo re-raises the
    # NotImplementedError as its own RuntimeError subclass).
    with ops.use_impl("triton"), pytest.raises(RuntimeError, match="semiseg::spatial_kl"):
        compiled(p, q)


def test_kernel_modules_register_their_launchers(monkeypatch):
    """A hot path registers the LAUNCHERS of the kernel module it imports; an import error is kept
    and named when "triton" is asked for."""
    module = types.ModuleType("semiseg_fast.kernels.graph")
    module.LAUNCHERS = {"graph_mix": lambda *args: "fused"}
    monkeypatch.setattr(_dispatch, "KERNELS", {})
    _dispatch.HotPath("graph", module)
    assert _dispatch.KERNELS == module.LAUNCHERS
    with pytest.raises(NotImplementedError, match="semiseg::graph_mix_backward"):
        ops.graph_mix(*graph_case()[:3], k=4, impl="triton")
    monkeypatch.setattr(_dispatch, "_IMPORT_ERRORS", {})
    _dispatch.HotPath("graph", ImportError("No module named 'triton'"))
    with pytest.raises(NotImplementedError, match=r"kernels/graph.py failed to import \(No module named 'triton'\)"):
        ops.graph_mix(*graph_case()[:3], k=4, impl="triton")


# ------------------------------------------------------------------------------------------------
# Argument checks: every error names the argument
# ------------------------------------------------------------------------------------------------

def _bad_calls():
    p, q, ignore = kl_case()
    anchors, keys_pos, bank, anchor_idx, neg_idx = sampled_case()
    z, labels, cbank, positive = bank_case(lc=True)
    Z, F, eta, conv_z, conv_f = graph_case()
    logits = torch.randn(2, 3, 4, 4, dtype=F64)
    kl, sc, cb = ops.spatial_kl, ops.sampled_contrast, ops.class_bank_contrast
    gp = ops.graph_propagate
    return [
        ("p", ValueError, lambda: kl(p[0], q[0])),
        ("q", ValueError, lambda: kl(p, q[:, :2])),
        ("q", TypeError, lambda: kl(p, q.float())),
        ("p", TypeError, lambda: kl(p.long(), q)),
        ("q", TypeError, lambda: kl(p, q.detach().numpy())),
        ("temperature", ValueError, lambda: kl(p, q, temperature=0.0)),
        ("temperature", TypeError, lambda: kl(p, q, temperature=torch.tensor(1.0))),
        ("tau", ValueError, lambda: kl(p, q, tau=1.5)),
        ("ignore", ValueError, lambda: kl(p, q, ignore=ignore[:, :2])),
        ("ignore", TypeError, lambda: kl(p, q, ignore=ignore.long())),
        ("reduction", ValueError, lambda: kl(p, q, reduction="avg")),
        ("logits", ValueError, lambda: ops.entropy_percentile(logits[0], 50)),
        ("q", ValueError, lambda: ops.entropy_percentile(logits, [50, 101])),
        ("q", ValueError, lambda: ops.entropy_percentile(logits, [])),
        ("q", ValueError, lambda: ops.percentile(logits, math.nan)),
        ("q", TypeError, lambda: ops.percentile(logits, "50")),
        ("valid", ValueError, lambda: ops.entropy_percentile(
            logits, 50, torch.ones(2, 4, 3, dtype=torch.bool))),
        ("valid", TypeError, lambda: ops.percentile(logits, 50, torch.ones_like(logits))),
        ("values", TypeError, lambda: ops.percentile(torch.arange(5), 50)),
        ("low_rank, high_rank", ValueError, lambda: ops.rank_mask(logits, 3, 3)),
        ("low_rank, high_rank", ValueError, lambda: ops.rank_mask(logits, -1, 3)),
        ("high_rank", TypeError, lambda: ops.rank_mask(logits, 1, 2.5)),
        ("anchors", ValueError, lambda: sc(anchors[0], keys_pos, bank, anchor_idx, neg_idx)),
        ("anchor_idx", TypeError, lambda: sc(anchors, keys_pos, bank, anchor_idx.int(),
                                             neg_idx)),
        ("keys_pos", ValueError, lambda: sc(anchors, keys_pos[:2], bank, anchor_idx, neg_idx)),
        ("keys_pos", TypeError, lambda: sc(anchors, keys_pos.float(), bank, anchor_idx,
                                           neg_idx)),
        ("bank", ValueError, lambda: sc(anchors, keys_pos, bank[:, :2], anchor_idx,
                                        neg_idx)),
        ("neg_idx", ValueError, lambda: sc(anchors, keys_pos, bank, anchor_idx, neg_idx[:, :1])),
        ("neg_idx", ValueError, lambda: sc(anchors, keys_pos, bank, anchor_idx, neg_idx + 100)),
        ("anchor_idx", ValueError, lambda: sc(anchors, keys_pos, bank, anchor_idx - 20,
                                              neg_idx)),
        ("temperature", ValueError, lambda: sc(anchors, keys_pos, bank, anchor_idx, neg_idx,
                                               -1.0)),
        ("active", ValueError, lambda: sc(anchors, keys_pos, bank, anchor_idx, neg_idx,
                                          active=torch.ones(2, dtype=torch.bool))),
        ("num_valid", ValueError, lambda: sc(anchors, keys_pos, bank, anchor_idx, neg_idx,
                                             num_valid=0)),
        ("num_valid", ValueError, lambda: sc(anchors, keys_pos, bank, anchor_idx, neg_idx,
                                             num_valid=torch.ones(2))),
        ("mode", ValueError, lambda: cb(z, labels, cbank, "mc")),
        ("positive", ValueError, lambda: cb(z, labels, cbank, "lc")),
        ("positive", ValueError, lambda: cb(z, labels, cbank, "hc", positive=positive)),
        ("positive", ValueError, lambda: cb(z, labels, cbank, "lc", positive=positive[:3])),
        ("labels", ValueError, lambda: cb(z, labels[:4], cbank)),
        ("labels", TypeError, lambda: cb(z, labels.float(), cbank)),
        ("labels", ValueError, lambda: cb(z, labels + 5, cbank)),
        ("bank", ValueError, lambda: cb(z, labels, cbank[0])),
        ("fill", ValueError, lambda: cb(z, labels, cbank, fill=[1, 2])),
        ("fill", ValueError, lambda: cb(z, labels, cbank, fill=[1, 2, 99])),
        ("eps", ValueError, lambda: cb(z, labels, cbank, eps=-1.0)),
        ("Z", ValueError, lambda: gp(Z[0], F, eta, conv_z, conv_f)),
        ("F", ValueError, lambda: gp(Z, F[:5], eta, conv_z, conv_f)),
        ("F", TypeError, lambda: gp(Z, F.float(), eta, conv_z, conv_f)),
        ("eta", ValueError, lambda: gp(Z, F, eta[:2], conv_z, conv_f, k=4)),
        ("k", ValueError, lambda: gp(Z, F, eta, conv_z, conv_f, k=13)),
        ("k", ValueError, lambda: gp(Z, F, eta, conv_z, conv_f, k=0)),
        ("h, w", ValueError, lambda: gp(Z, F, eta, conv_z, conv_f, k=4, h=3)),
        ("h, w", ValueError, lambda: gp(Z, F, eta, conv_z, conv_f, k=4, h=5, w=5)),
        ("h, w", ValueError, lambda: gp(Z, F, eta, conv_z, conv_f, k=4, official_layout=True)),
        ("conv_z, conv_f", TypeError, lambda: gp(Z, F, eta, None, conv_f, k=4)),
        ("y", TypeError, lambda: ops.class_propagate(Z, Z[:, 0], F)),
        # a batch of graphs: [B, N, *] nodes, [B, N] labels
        ("Z", ValueError, lambda: gp(Z[None, None], F, eta, conv_z, conv_f)),
        ("F", ValueError, lambda: gp(Z[None], F, eta, conv_z, conv_f)),
        ("F", ValueError, lambda: gp(Z.expand(2, -1, -1), F.expand(3, -1, -1), eta, conv_z, conv_f)),
        ("k", ValueError, lambda: gp(Z[None], F[None], eta, conv_z, conv_f, k=13)),
        ("y", ValueError, lambda: ops.class_propagate(Z[None], torch.zeros(Z.shape[0], dtype=torch.long),
                                                      F[None])),
    ]


def test_errors_name_the_argument():
    for name, exc, call in _bad_calls():
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(f"{name}:"), (name, str(info.value))


# ------------------------------------------------------------------------------------------------
# What a kernel would read out of bounds is refused up front, on every path (each case below
# crashed, read garbage or was silently accepted by the fused path before)
# ------------------------------------------------------------------------------------------------

def _bad_inputs():
    torch.manual_seed(0)
    z, bank, labels = torch.randn(6, 8), torch.randn(5, 7, 8), torch.tensor([0, 1, 2, 3, 4, 1])
    a, kp, bk = torch.randn(10, 8), torch.randn(3, 8), torch.randn(20, 8)
    ai, ni = torch.randint(0, 10, (3, 4)), torch.randint(0, 20, (3, 4, 5))
    Z, F, eta = torch.randn(12, 5), torch.randn(12, 8), torch.full((5,), 0.5)
    logits = torch.randn(1, 3, 4, 4)
    return {
        "anchor_idx out of range": (lambda **kw: ops.sampled_contrast(a, kp, bk, ai + 10, ni, **kw), "anchor_idx: expected indices in \\[0, N = 10\\), got 1"),
        "neg_idx negative": (lambda **kw: ops.sampled_contrast(a, kp, bk, ai, ni - 25, **kw), "neg_idx: expected row indices in \\[0, R = 20\\)"),
        "sampled D = 0": (lambda **kw: ops.sampled_contrast(a[:, :0], kp[:, :0], bk[:, :0], ai, ni, **kw), "anchors: expected D >= 1"),
        "bank label >= C": (lambda **kw: ops.class_bank_contrast(z, torch.tensor([0, 1, 2, 3, 4, 9]), bank, **kw), "labels: expected values < C = 5.*got 9"),
        "bank fill > Q": (lambda **kw: ops.class_bank_contrast(z, labels, bank, fill=torch.tensor([7, 9, 7, 7, 7]), **kw), "fill: expected entry counts in \\[0, Q = 7\\], got 9"),
        "bank fill < 0": (lambda **kw: ops.class_bank_contrast(z, labels, bank, fill=[7, -1, 7, 7, 7], **kw), "fill: .* got -1"),
        "bank eps = inf": (lambda **kw: ops.class_bank_contrast(z, labels, bank, eps=float("inf"), **kw), "eps: expected a finite number"),
        "bank D = 0": (lambda **kw: ops.class_bank_contrast(z[:, :0], labels, bank[:, :, :0], **kw), "z: expected D >= 1"),
        "graph threshold = nan": (lambda **kw: ops.graph_mix(Z, F, eta, k=4, threshold=float("nan"), **kw), "threshold: expected a confidence in \\[0, 1\\], got nan"),
        "graph D = 0": (lambda **kw: ops.graph_mix(Z, F[:, :0], eta, k=4, **kw), "F: expected D >= 1"),
        "class graph label >= num_labels": (lambda **kw: ops.class_propagate(Z[:, :3], torch.full((12,), 4), F, **kw), "y: expected labels in \\[0, 3\\), got 4"),
        "teacher_stats h = 0": (lambda **kw: ops.teacher_stats(logits[:, :, :0], (8, 8), **kw), "logits: expected a grid of at least 1 x 1"),
        "entropy_percentile w = 0": (lambda **kw: ops.entropy_percentile(logits[..., :0], [50.0], size=(4, 4), **kw), "logits: expected a grid of at least 1 x 1"),
    }


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_out_of_bounds_inputs_are_refused(case, impl):
    if impl == "triton" and not _dispatch.KERNELS:
        pytest.skip("triton not importable")
    call, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        call(impl=impl)


def _graph_case_with_nan():
    torch.manual_seed(0)
    Z, F, eta = torch.randn(2, 12, 5, dtype=torch.float64), torch.randn(2, 12, 8, dtype=torch.float64), torch.full((5,), 0.5)
    F[1, 3, 2] = float("nan")
    return Z, F, eta


def test_graph_mix_propagates_non_finite_features_as_the_reference(monkeypatch):
    if "graph_mix" not in _dispatch.KERNELS:
        pytest.skip("triton not importable")
    Z, F, eta = _graph_case_with_nan()
    Z32, F32 = Z.float().requires_grad_(True), F.float()
    out = {impl: ops.graph_mix(Z32, F32, eta.float(), k=4, impl=impl)[0] for impl in ("triton", "reference")}
    assert torch.equal(out["triton"].isnan(), out["reference"].isnan())
    assert out["triton"][1].isnan().all() and not out["triton"][0].isnan().any()  # only the graph holding it
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=1e-5, atol=1e-6)


def test_graph_propagate_with_a_channel_reducing_conv_z():
    if "class_propagate" not in _dispatch.KERNELS:
        pytest.skip("triton not importable")
    torch.manual_seed(0)
    Z, F, eta = torch.randn(12, 5), torch.randn(12, 8), torch.full((5,), 0.5)
    conv_z, conv_f = nn.Conv2d(5, 3, 1), nn.Conv2d(8, 8, 1)
    got = {impl: ops.graph_propagate(Z, F, eta, conv_z, conv_f, k=4, impl=impl) for impl in ("triton", "reference")}
    for a, b in zip(got["triton"], got["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="conv_z: the official layout needs conv_z to keep the C = 5 classes"):
        ops.graph_propagate(Z, F, eta, conv_z, conv_f, k=4, official_layout=True, h=3, w=4)
