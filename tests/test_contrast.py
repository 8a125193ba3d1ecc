"""Fused U2PL sampled contrast (kernels/contrast.py) against the float64 reference.

CPU: Triton interpreter at small sizes; the ``gpu`` test runs U2PL's VOC shapes. Tolerance
(DESIGN.md): the kernel's error against float64 is at most twice the float32 reference's, plus a
small floor.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from semiseg_fast import ops
from semiseg_fast import reference as ref
from semiseg_fast.ops import _dispatch

pytestmark = pytest.mark.skipif("sampled_contrast" not in _dispatch.KERNELS, reason="triton not importable")


def case(n=37, d=24, k=3, m=21, rows=50, nneg=7, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(n, d, generator=g).to(device, dtype)
    keys_pos = torch.randn(k, d, generator=g).to(device, dtype)
    bank = torch.randn(rows, d, generator=g).to(device, dtype)
    anchor_idx = torch.randint(0, n, (k, m), generator=g).to(device)
    anchor_idx[0, :5] = 2  # a pixel drawn five times: its gradients add
    neg_idx = torch.randint(0, rows, (k, m, nneg), generator=g).to(device)
    return anchors, keys_pos, bank, anchor_idx, neg_idx


def check(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature=0.5, active=None, num_valid=2.0,
          grad=1.7, floor=1e-6):
    a = anchors.detach().clone().requires_grad_(True)
    fused = ops.sampled_contrast(a, keys_pos, bank, anchor_idx, neg_idx, temperature, num_valid=num_valid,
                                 active=active, impl="triton")
    args64 = (anchors.double(), keys_pos.double(), bank.double(), anchor_idx, neg_idx, temperature)
    args32 = (anchors.float(), keys_pos.float(), bank.float(), anchor_idx, neg_idx, temperature)
    exact = ref.sampled_contrast(*args64, num_valid=num_valid, active=active)
    low = ref.sampled_contrast(*args32, num_valid=num_valid, active=active)
    err, base = (fused.double() - exact).abs().item(), (low.double() - exact).abs().item()
    assert err <= 2 * base + floor, (err, base)
    (da,) = torch.autograd.grad(fused, a, torch.tensor(grad, dtype=fused.dtype))
    g_exact = ref.sampled_contrast_grad(*args64, num_valid=num_valid, active=active,
                                        grad_output=torch.tensor(grad, dtype=torch.float64))
    g_low = ref.sampled_contrast_grad(*args32, num_valid=num_valid, active=active,
                                      grad_output=torch.tensor(grad))
    err = (da.double() - g_exact).abs().max().item()
    base = (g_low.double() - g_exact).abs().max().item()
    assert err <= 2 * base + floor, (err, base)
    return fused, da


def test_matches_reference_with_duplicates_and_odd_sizes():
    fused, da = check(*case())
    assert fused > 0 and da[2].abs().sum() > 0
    check(*case(n=5, d=3, k=1, m=1, rows=2, nneg=1, seed=1), temperature=0.1)
    check(*case(n=300, d=256, k=2, m=40, rows=70, nneg=50, seed=2))


def test_inactive_rows_and_no_negatives():
    anchors, keys_pos, bank, aidx, nidx = case(seed=3)
    active = torch.tensor([True, False, True])
    fused, da = check(anchors, keys_pos, bank, aidx, nidx, active=active, num_valid=torch.tensor(3.0))
    only_inactive = torch.ones(anchors.shape[0], dtype=torch.bool)
    only_inactive[aidx[[0, 2]].reshape(-1)] = False
    assert (da[only_inactive] == 0).all()  # pixels drawn only by the inactive row get nothing
    # no negatives: the positive alone is a loss of exactly 0
    out = ops.sampled_contrast(anchors, keys_pos, bank, aidx, nidx[:, :, :0], impl="triton")
    assert out == 0


def test_bf16_inputs_accumulate_in_fp32():
    anchors, keys_pos, bank, aidx, nidx = case(dtype=torch.bfloat16, seed=4)
    fused, da = check(anchors, keys_pos, bank, aidx, nidx, floor=2e-2)
    assert fused.dtype == torch.bfloat16 and da.dtype == torch.bfloat16


def test_empty_cases_and_opcheck_and_compile():
    anchors, keys_pos, bank, aidx, nidx = case(n=9, d=5, k=2, m=3, rows=6, nneg=2, seed=5)
    a = anchors.clone().requires_grad_(True)
    out = ops.sampled_contrast(a, keys_pos[:0], bank, aidx[:0], nidx[:0], impl="triton")
    (g,) = torch.autograd.grad(out, a)
    assert out == 0 and (g == 0).all()
    torch.library.opcheck(torch.ops.semiseg.sampled_contrast.default,
                          (a, keys_pos, bank, aidx, nidx, 0.5, None, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(lambda a: ops.sampled_contrast(a, keys_pos, bank, aidx, nidx, impl="triton"),
                             fullgraph=True, backend="aot_eager")
    got = compiled(a)
    torch.testing.assert_close(got, ops.sampled_contrast(anchors, keys_pos, bank, aidx, nidx, impl="reference"))


# -- CTT dense HC / LC ---------------------------------------------------------------------------

def bank_case(n=45, d=24, c=4, q=6, lc=False, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    labels = torch.randint(-1, c, (n,), generator=g)
    bank = torch.nn.functional.normalize(torch.randn(c, 2 * q if lc else q, d, generator=g), dim=2)
    positive = torch.randn(n, d, generator=g) if lc else None
    cast = (lambda t: None if t is None else t.to(device, dtype))
    return cast(z), labels.to(device), cast(bank), cast(positive)


def check_bank(z, labels, bank, positive, mode, fill=None, detach_positive=True, grad=0.7, floor=1e-6):
    leaves = [z.detach().clone().requires_grad_(True)]
    pos = None
    if positive is not None:
        pos = positive.detach().clone().requires_grad_(not detach_positive)
        if not detach_positive:
            leaves.append(pos)
    fused = ops.class_bank_contrast(leaves[0], labels, bank, mode, positive=pos, fill=fill,
                                    detach_positive=detach_positive, impl="triton")

    def reference(dtype):
        zz = z.detach().to(dtype).requires_grad_(True)
        pp = None if positive is None else positive.detach().to(dtype).requires_grad_(not detach_positive)
        out = ops.class_bank_contrast(zz, labels, bank.to(dtype), mode, positive=pp, fill=fill,
                                      detach_positive=detach_positive, impl="reference")
        wrt = [zz] + ([pp] if pp is not None and not detach_positive else [])
        return out, torch.autograd.grad(out * grad, wrt) if out.requires_grad else [torch.zeros_like(w) for w in wrt]

    exact, g_exact = reference(torch.float64)
    low, g_low = reference(torch.float32)
    err, base = (fused.double() - exact).abs().item(), (low.double() - exact).abs().item()
    assert err <= 2 * base + floor, (err, base)
    if fused.requires_grad:
        got = torch.autograd.grad(fused * grad, leaves)
        for a, e, lo in zip(got, g_exact, g_low):
            err = (a.double() - e).abs().max().item()
            base = (lo.double() - e).abs().max().item()
            assert err <= 2 * base + floor, (err, base)
    return fused


@pytest.mark.parametrize("fill", [None, [6, 2, 0, 6]])
def test_hc_matches_reference(fill):
    z, labels, bank, _ = bank_case()
    fill = None if fill is None else torch.tensor(fill)
    assert check_bank(z, labels, bank, None, "hc", fill=fill) > 0
    check_bank(*bank_case(n=3, d=5, c=2, q=1, seed=1)[:3], None, "hc")
    check_bank(*bank_case(n=70, d=256, c=5, q=40, seed=2)[:3], None, "hc")


@pytest.mark.parametrize("detach_positive", [True, False])
def test_lc_matches_reference_with_and_without_positive_gradient(detach_positive):
    z, labels, bank, positive = bank_case(lc=True, seed=3)
    assert check_bank(z, labels, bank, positive, "lc", detach_positive=detach_positive) > 0


def test_bank_no_anchor_gives_zero_and_half_precision():
    z, labels, bank, _ = bank_case(seed=4)
    none = torch.full_like(labels, -1)
    zz = z.clone().requires_grad_(True)
    out = ops.class_bank_contrast(zz, none, bank, "hc", impl="triton")
    (g,) = torch.autograd.grad(out, zz)
    assert out == 0 and (g == 0).all()
    z16, labels16, bank16, _ = bank_case(dtype=torch.float16, seed=5)
    out = check_bank(z16, labels16, bank16, None, "hc", floor=5e-3)
    assert out.dtype == torch.float16


def test_bank_opcheck_and_compile():
    z, labels, bank, positive = bank_case(n=20, d=8, c=3, q=4, lc=True, seed=6)
    zz = z.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.semiseg.class_bank_contrast.default,
                          (zz, labels, bank, positive, None, "lc", 0.5, 1e-12, "triton", "tf32"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(lambda z: ops.class_bank_contrast(z, labels, bank[:, :4], "hc", impl="triton"),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(zz), ops.class_bank_contrast(z, labels, bank[:, :4], "hc", impl="reference"))



def test_bank_all_anchors_in_one_class_eps_zero_and_partial_banks():
    # one class holds every anchor; class 0's bank is empty, class 2's half full; N = 45 is not a
    # multiple of the 16-anchor block, and 23 non-anchors fill the first block (label order)
    z, labels, bank, positive = bank_case(lc=True, seed=8)
    one = torch.full_like(labels, 3)
    one[::2] = -1
    fill = torch.tensor([0, 12, 5, 12])
    assert check_bank(z, one, bank[:, :6].contiguous(), None, "hc", fill=torch.tensor([0, 6, 3, 6])) > 0
    assert check_bank(z, one, bank, positive, "lc", fill=fill, detach_positive=False) > 0
    # slots past fill are not read: garbage there (a bank from torch.empty) changes nothing
    junk = bank.clone()
    junk[0] = float("inf")
    junk[2, 5:] = float("nan")
    junk[1, 12:] = -float("inf")
    assert check_bank(z, labels, junk, positive, "lc", fill=fill, detach_positive=False) > 0
    assert check_bank(z, labels, junk[:, :6].contiguous(), None, "hc", fill=torch.tensor([0, 6, 3, 6])) > 0
    for mode, b, pos in (("hc", bank[:, :6].contiguous(), None), ("lc", bank, positive)):
        fused = ops.class_bank_contrast(z, labels, b, mode, positive=pos, eps=0.0, impl="triton")
        exact = ops.class_bank_contrast(z.double(), labels, b.double(), mode, eps=0.0, impl="reference",
                                        positive=None if pos is None else pos.double())
        # fp32 cosines at t = 0.1/0.5 move the loss by ~1e-6 of its value
        torch.testing.assert_close(fused.double(), exact, rtol=1e-5, atol=1e-6)


def stable_bank_loss(z, labels, bank, positive, mode, temperature, eps=1e-12):
    """The official HC/LC value (full banks) computed in the log domain in z's dtype: the
    same-precision PyTorch baseline for logits whose plain exp overflows (the reference's would)."""
    c, q, d = bank.shape
    s = F.normalize(z, dim=1) @ F.normalize(bank.reshape(c * q, d), dim=1).T / temperature
    same = labels[:, None] == torch.arange(c * q, device=z.device)[None, :] // q
    log_eps = torch.tensor(math.log(eps), dtype=z.dtype, device=z.device)
    lne = torch.logaddexp(torch.logsumexp(s.masked_fill(same, float("-inf")), dim=1), log_eps)
    if mode == "hc":
        a = s
    else:
        a = (F.normalize(z, dim=1) * F.normalize(positive, dim=1)).sum(1, keepdim=True) / temperature
    per = -torch.logaddexp(a - torch.logaddexp(a, lne[:, None]), log_eps)
    per = torch.where(same, per, 0.0).sum(1) / q if mode == "hc" else per[:, 0]
    means = [per[labels == k].mean() for k in range(c) if bool((labels == k).any())]
    return torch.stack(means).mean()


@pytest.mark.parametrize("mode", ["hc", "lc"])
def test_bank_logits_beyond_fp32_exp_range(mode):
    # t = 0.005: a cosine of 1 is a logit of 200, and e^200 overflows fp32 (max e^88.7) but not
    # float64. Bank rows copied from anchors make such positives and negatives exist.
    t = 0.005
    z, labels, bank, positive = bank_case(n=40, lc=mode == "lc", seed=10)
    labels = torch.arange(40) % 4
    # near copies (cos ~ 0.999), not exact ones: an exact copy makes the gradient's g - cos z a
    # difference of two separately rounded unit vectors, which measures rounding, not the kernel
    near = F.normalize(F.normalize(z, dim=1) + 0.03 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1)),
                       dim=1)
    for k in range(4):
        bank[k, 0] = near[k]  # the anchor's own direction as a positive (HC) ...
        bank[(k + 1) % 4, 1] = near[k]  # ... and as a negative of another class
    zz = z.clone().requires_grad_(True)
    plain = ops.class_bank_contrast(zz, labels, bank, mode, positive=positive, temperature=t, impl="reference")
    assert not torch.isfinite(plain) or not torch.isfinite(torch.autograd.grad(plain, zz)[0]).all()
    fused = ops.class_bank_contrast(zz, labels, bank, mode, positive=positive, temperature=t, impl="triton")
    (g_fused,) = torch.autograd.grad(fused * 0.7, zz)
    z64 = z.double().requires_grad_(True)
    pos64 = None if positive is None else positive.double()
    exact = ref.class_bank_contrast_hc(z64, labels, bank.double(), t) if mode == "hc" else \
        ref.class_bank_contrast_lc(z64, labels, pos64, bank.double(), t)
    (g_exact,) = torch.autograd.grad(exact * 0.7, z64)
    z32 = z.clone().requires_grad_(True)
    low = stable_bank_loss(z32, labels, bank, positive, mode, t)
    (g_low,) = torch.autograd.grad(low * 0.7, z32)
    assert torch.isfinite(exact) and exact > 1  # the large logits dominate the value
    # DESIGN rule against the stable fp32 baseline; floor: 2 ulp of fp32 at the loss's size
    err, base = (fused.double() - exact).abs().item(), (low.double() - exact).abs().item()
    assert err <= 2 * base + 2.4e-7 * exact.item(), (err, base)
    err = (g_fused.double() - g_exact).abs().max().item()
    base = (g_low.double() - g_exact).abs().max().item()
    # gradient floor: one fp32 rounding of a cosine (2^-24) is 2^-24 / t in a logit, and the
    # gradient (a softmax-weighted sum of 1/t-scaled directions) moves by that fraction of its size
    assert err <= 2 * base + 2.0**-24 / t * g_exact.abs().max().item(), (err, base)


def check_bank_half(z, labels, bank, positive, mode, grad=0.7):
    """bf16/fp16 kernel against float64, DESIGN's rule with the same-precision PyTorch: the
    official formula run on the half tensors themselves (half matmul, exp and sums). Floor: one
    ulp of the half result at its size (2^-7 relative for bf16, 2^-10 for fp16), an error any
    implementation returning that dtype makes."""
    ulp = 2.0 ** (-7 if z.dtype == torch.bfloat16 else -10)

    def run(dt, fn):
        zz = z.detach().to(dt).requires_grad_(True)
        pos = None if positive is None else positive.to(dt)
        out = fn(zz, bank.to(dt), pos)
        return out.double(), torch.autograd.grad(out * grad, zz)[0].double()

    official = (lambda zz, b, p: ref.class_bank_contrast_hc(zz, labels, b)) if mode == "hc" else \
        (lambda zz, b, p: ref.class_bank_contrast_lc(zz, labels, p, b))
    fused, g_fused = run(z.dtype, lambda zz, b, p: ops.class_bank_contrast(zz, labels, b, mode, positive=p,
                                                                           impl="triton"))
    exact, g_exact = run(torch.float64, official)
    low, g_low = run(z.dtype, official)
    assert (fused - exact).abs() <= 2 * (low - exact).abs() + ulp * exact.abs()
    err, base = (g_fused - g_exact).abs().max(), (g_low - g_exact).abs().max()
    assert err <= 2 * base + ulp * g_exact.abs().max(), (err.item(), base.item())
    return fused


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["hc", "lc"])
def test_bank_half_inputs_on_the_tensor_core_path(mode, dtype):
    # the interpreter computes bf16 dots through an fp32 upcast of the bf16 values (the rounding
    # to bf16, of the unit rows and of the backward's e^{b - m}, still happens)
    for seed in (11, 12):
        z, labels, bank, positive = bank_case(lc=mode == "lc", dtype=dtype, seed=seed)
        assert check_bank_half(z, labels, bank, positive, mode) > 0


def test_bank_precision_rule(monkeypatch):
    from semiseg_fast.kernels import contrast as kernels

    seen = []

    class Spy:  # records the dot precision each launch compiles for
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["PRECISION"])
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_bank_kernel", Spy(kernels._bank_kernel))
    z, labels, bank, _ = bank_case(n=20, d=16, c=3, q=4, seed=13)
    previous = torch.get_float32_matmul_precision()
    try:
        for setting, precision, expected in (("highest", None, "ieee"), ("high", None, "tf32"),
                                             ("medium", None, "tf32"), ("high", "ieee", "ieee"),
                                             ("highest", "tf32", "tf32")):
            torch.set_float32_matmul_precision(setting)
            seen.clear()
            zz = z.clone().requires_grad_(True)
            out = ops.class_bank_contrast(zz, labels, bank, "hc", precision=precision, impl="triton")
            out.backward()
            assert seen == [expected, expected], (setting, precision, seen)
            # the interpreter computes tf32 in fp32: the values stay the reference's
            torch.testing.assert_close(out, ops.class_bank_contrast(z, labels, bank, "hc", impl="reference"))
        seen.clear()
        ops.class_bank_contrast(z.to(torch.bfloat16), labels, bank.to(torch.bfloat16), "hc", precision="ieee",
                                impl="triton")
        assert seen == ["tf32"]  # 16-bit operands: precision does not apply (the tl.dot default)
    finally:
        torch.set_float32_matmul_precision(previous)
    # the per-backend API (after which torch's legacy getter raises), and a switch flipped between
    # forward and backward: the backward keeps the forward's precision
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        before = matmul.fp32_precision
        try:
            matmul.fp32_precision = "tf32"
            seen.clear()
            zz = z.clone().requires_grad_(True)
            out = ops.class_bank_contrast(zz, labels, bank, "hc", impl="triton")
            matmul.fp32_precision = "ieee"
            out.backward()
            assert seen == ["tf32", "tf32"], seen
        finally:
            matmul.fp32_precision = before
    with pytest.raises(ValueError, match="precision"):
        ops.class_bank_contrast(z, labels, bank, "hc", precision="bf16x3")
    with pytest.raises(NotImplementedError, match="triton"):
        ops.class_bank_contrast(z.double(), labels, bank.double(), "hc", impl="triton")
    assert ops.class_bank_contrast(z.double(), labels, bank.double(), "hc").dtype == torch.float64  # auto: ref


@pytest.mark.gpu
@pytest.mark.parametrize("matmul_precision", ["highest", "high"])
def test_ctt_voc_shapes_on_gpu_without_syncs(matmul_precision):
    # 10 + 10 images at 41 x 41: 33,620 anchors against 21 x 256 (HC) and 21 x 512 (LC) entries.
    # "high": the kernel's fp32 dots run in TF32, and so do the float32 reference's matmuls: the
    # same-precision PyTorch of DESIGN's rule, so 2x its error still bounds the kernel's
    z, labels, bank, positive = bank_case(n=33620, d=256, c=21, q=256, lc=True, device="cuda", seed=7)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        check_bank(z, labels, bank[:, :256].contiguous(), None, "hc", floor=1e-5)
        check_bank(z, labels, bank, positive, "lc", floor=1e-5)
    finally:
        torch.set_float32_matmul_precision(previous)
    zz = z.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.class_bank_contrast(zz, labels, bank, "lc", positive=positive)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ctt_half_precision_at_real_sizes_on_gpu(dtype):
    # tensor-core bf16/fp16 dots at CTT VOC (HC, LC) and Cityscapes (HC) sizes, against the
    # official formula run in that dtype (check_bank_half says why that bound)
    z, labels, bank, positive = bank_case(n=33620, d=256, c=21, q=256, lc=True, dtype=dtype, device="cuda", seed=14)
    check_bank_half(z, labels, bank[:, :256].contiguous(), None, "hc")
    check_bank_half(z, labels, bank, positive, "lc")
    z, labels, bank, _ = bank_case(n=8580, d=256, c=19, q=256, dtype=dtype, device="cuda", seed=15)
    check_bank_half(z, labels, bank, None, "hc")


@pytest.mark.gpu
def test_ctt_large_logits_on_gpu():
    # t = 0.01 at real sizes: logits up to 100, past fp32's exp range, in fp32 and bf16
    z, labels, bank, positive = bank_case(n=33620, d=256, c=21, q=256, lc=True, device="cuda", seed=16)
    bank[:, 0] = F.normalize(z[:21], dim=1)  # cos(z_p, its class's entry 0) = 1 for 21 anchors
    for dtype in (torch.float32, torch.bfloat16):
        zz = z.to(dtype).requires_grad_(True)
        out = ops.class_bank_contrast(zz, labels, bank.to(dtype), "lc", positive=positive.to(dtype),
                                      temperature=0.01)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(zz.grad).all()
        exact = ref.class_bank_contrast_lc(z.double(), labels, positive.double(), bank.double(), 0.01)
        # the loss moves by at most twice the largest logit error (softmax weights sum to 1, plus
        # the positive's own). A cosine of unit rows errs by <= D 2^-24 in fp32 (dot bound) and by
        # <= 2^-8 in bf16 (both operands rounded by 2^-9, sum |z_i g_i| <= 1); a logit by that / t
        tol = 2 * (256 * 2.0**-24 if dtype == torch.float32 else 2.0**-8) / 0.01
        assert abs(out.double().item() - exact.item()) <= tol


@pytest.mark.gpu
def test_u2pl_voc_shapes_on_gpu_without_syncs():
    # 8 x 129^2 pixels, 21 classes x 256 anchors x 50 negatives from 21 queues of 30000 rows
    anchors, keys_pos, bank, aidx, nidx = case(n=8 * 129 * 129, d=256, k=21, m=256, rows=21 * 30000, nneg=50,
                                               device="cuda", seed=6)
    check(anchors, keys_pos, bank, aidx, nidx, floor=1e-5)
    a = anchors.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.sampled_contrast(a, keys_pos, bank, aidx, nidx, num_valid=torch.tensor(21.0, device="cuda"))
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sampled_backward_is_bit_reproducible_in_deterministic_mode():
    anchors, keys_pos, bank, aidx, nidx = case(seed=9)
    aidx[:, :8] = 5  # many duplicates of one pixel across rows
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            a = anchors.clone().requires_grad_(True)
            out = ops.sampled_contrast(a, keys_pos, bank, aidx, nidx, impl="triton")
            grads.append(torch.autograd.grad(out, a)[0])
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])
