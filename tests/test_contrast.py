"""Fused U2PL sampled contrast (kernels/contrast.py) against the float64 reference.

CPU: Triton interpreter at small sizes; the ``gpu`` test runs U2PL's VOC shapes. Tolerance
(DESIGN.md): the kernel's error against float64 is at most twice the float32 reference's, plus a
small floor.
"""
import pytest
import torch

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
                          (zz, labels, bank, positive, None, "lc", 0.5, 1e-12, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(lambda z: ops.class_bank_contrast(z, labels, bank[:, :4], "hc", impl="triton"),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(zz), ops.class_bank_contrast(z, labels, bank[:, :4], "hc", impl="reference"))


@pytest.mark.gpu
def test_ctt_voc_shapes_on_gpu_without_syncs():
    # 10 + 10 images at 41 x 41: 33,620 anchors against 21 x 256 (HC) and 21 x 512 (LC) entries
    z, labels, bank, positive = bank_case(n=33620, d=256, c=21, q=256, lc=True, device="cuda", seed=7)
    check_bank(z, labels, bank[:, :256].contiguous(), None, "hc", floor=1e-5)
    check_bank(z, labels, bank, positive, "lc", floor=1e-5)
    zz = z.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.class_bank_contrast(zz, labels, bank, "lc", positive=positive)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
