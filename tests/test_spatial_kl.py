"""Fused spatial-softmax KL kernel (kernels/spatial_kl.py) against the float64 reference.

On CPU the kernels run in the Triton interpreter (small sizes); the ``gpu`` tests repeat the
checks at the real IPixMatch sizes. Tolerance (DESIGN.md): the kernel's error against the float64
reference is at most twice the error of the reference run in the kernel's input precision, plus a
small absolute floor.
"""
import pytest
import torch

from semiseg_fast import ops
from semiseg_fast import reference as ref
from semiseg_fast.ops import _dispatch

pytestmark = pytest.mark.skipif("spatial_kl" not in _dispatch.KERNELS, reason="triton not importable")


def case(b=3, c=5, h=7, w=9, dtype=torch.float32, device="cpu", seed=0, sharp=3.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # sharp teacher logits so that a fair share of pixels pass tau
    p = (torch.randn(b, c, h, w, generator=g) * sharp).to(device=device, dtype=dtype)
    q = torch.randn(b, c, h, w, generator=g).to(device=device, dtype=dtype)
    ignore = (torch.rand(b, h, w, generator=g) < 0.2).to(device)
    return p, q, ignore


def _errors(fused, same_precision, exact):
    return (fused.double() - exact).abs().max().item(), (same_precision.double() - exact).abs().max().item()


def check(p, q, ignore=None, reduction="mean", tau=0.8, temperature=4.0, floor=1e-6, grad_scale=None):
    qf = q.detach().clone().requires_grad_(True)
    fused = ops.spatial_kl(p, qf, temperature, tau, ignore, reduction, impl="triton")
    exact = ref.spatial_kl(p.double(), q.double(), temperature, tau, ignore, reduction)
    low = ops.spatial_kl(p, q, temperature, tau, ignore, reduction, impl="reference")
    err, base = _errors(fused, low, exact)
    assert err <= 2 * base + floor, (err, base)
    g = torch.ones_like(fused) if grad_scale is None else grad_scale.to(fused)
    (dq,) = torch.autograd.grad(fused, qf, g)
    dq_exact = ref.spatial_kl_grad(p.double(), q.double(), temperature, tau, ignore, reduction,
                                   grad_output=g.double())
    dq_low = ref.spatial_kl_grad(p.float(), q.float(), temperature, tau, ignore, reduction, grad_output=g.float())
    err, base = _errors(dq, dq_low, dq_exact)
    assert err <= 2 * base + floor, (err, base)
    return fused, dq


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_random(reduction):
    p, q, ignore = case()
    check(p, q, ignore, reduction, grad_scale=torch.tensor([0.5, -2.0, 3.0]) if reduction == "none" else
          torch.tensor(1.7))
    check(p, q, None, reduction)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 129), (1, 21, 5, 53), (2, 2, 16, 16)])
def test_odd_sizes_and_rows_split_over_programs(shape):
    p, q, ignore = case(*shape, seed=1)
    check(p, q, ignore)


def test_omega_sizes_zero_one_two_and_all():
    b, c, h, w = 4, 3, 5, 6
    p = torch.zeros(b, c, h, w)  # uniform teacher: confidence 1/3 everywhere
    p[1, 0, 0, 0] = 20.0  # image 1: exactly one confident pixel
    p[2, 0, 0, :2] = 20.0  # image 2: exactly two
    p[3, 0] = 20.0  # image 3: every pixel
    q = torch.randn(b, c, h, w)
    per_image, dq = check(p, q, reduction="none", tau=0.8)
    assert per_image[0] == 0 and per_image[1] == 0 and per_image[2] > 0 and per_image[3] > 0
    assert (dq[:2] == 0).all()


def test_all_ignored_image_and_non_finite_student_outside_omega():
    p, q, ignore = case(b=2, c=4, h=6, w=5, sharp=6.0)
    ignore[0] = True
    omega = ref.confident_set(p, 0.8, ignore).reshape(2, 6, 5)
    q = q.clone()
    q[:, 1][~omega] = float("inf")  # never read as a value outside Omega
    qf = q.clone().requires_grad_(True)
    loss = ops.spatial_kl(p, qf, ignore=ignore, reduction="none", impl="triton")
    assert loss[0] == 0 and torch.isfinite(loss).all()
    (dq,) = torch.autograd.grad(loss.sum(), qf)
    assert torch.isfinite(dq).all() and (dq[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    p, q, ignore = case(b=2, c=5, h=9, w=11, dtype=dtype, seed=3)
    fused, dq = check(p, q, ignore, floor=2e-3)
    assert fused.dtype == dtype and dq.dtype == dtype


def test_every_output_element_is_written(monkeypatch):
    # NaN-poisoned allocations: any element a kernel skipped would surface as NaN
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    def poisoned_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "empty_like", poisoned_like)
    p, q, ignore = case(b=2, c=3, h=5, w=130, seed=4)
    check(p, q, ignore)


def test_opcheck_and_fullgraph_compile():
    p, q, ignore = case(b=2, c=3, h=4, w=5, seed=5)
    qf = q.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.semiseg.spatial_kl.default, (p, qf, 4.0, 0.8, ignore, "mean", "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(lambda p, q: ops.spatial_kl(p, q, ignore=ignore, impl="triton"), fullgraph=True,
                             backend="aot_eager")
    out = compiled(p, qf)
    expected = ops.spatial_kl(p, q, ignore=ignore, impl="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (dq,) = torch.autograd.grad(out, qf)
    torch.testing.assert_close(dq, ref.spatial_kl_grad(p, q, ignore=ignore), rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("b,c,hw", [(8, 21, 321), (2, 21, 513), (1, 19, 801)])
def test_real_sizes_on_gpu(b, c, hw):
    p, q, ignore = case(b, c, hw, hw, device="cuda", seed=6)
    check(p, q, ignore, floor=1e-5)
    check(p.bfloat16(), q.bfloat16(), ignore, floor=2e-3)


def test_forward_statistics_match_between_implementations():
    # the backward consumes them, so kernel and reference paths must agree on their meaning
    p, q, ignore = case(b=3, c=4, h=6, w=7, seed=8)
    p[1] = 0.0  # an image without Omega: LSE -inf, weight 0
    out_k = torch.ops.semiseg.spatial_kl(p, q, 4.0, 0.8, ignore, "none", "triton")
    out_r = torch.ops.semiseg.spatial_kl(p.double(), q.double(), 4.0, 0.8, ignore, "none", "reference")
    torch.testing.assert_close(out_k[0].double(), out_r[0], rtol=1e-5, atol=1e-6)
    finite = torch.isfinite(out_r[1])
    assert torch.equal(finite, torch.isfinite(out_k[1])) and not finite[1].any()
    torch.testing.assert_close(out_k[1][finite].double(), out_r[1][finite].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k[2], out_r[2])
