"""Fused entropy / exact percentile / rank-mask kernels (kernels/entropy_percentile.py).

Percentiles are compared with ``numpy.percentile`` bit for bit on the very float32 values the kernel
selected from (the entropy map it returned), the entropy with the float64 reference by the DESIGN
tolerance rule, and the rank masks with the stable-sort reference exactly. CPU: Triton interpreter.
"""
import zlib

import numpy as np
import pytest
import torch

from semiseg_fast import ops
from semiseg_fast import reference as ref
from semiseg_fast.ops import _dispatch

pytestmark = pytest.mark.skipif("percentile" not in _dispatch.KERNELS, reason="triton not importable")

QS = [0.0, 0.5, 10.0, 33.3, 50.0, 80.0, 99.9, 100.0]


def _numpy(values, valid, qs):
    sel = values.numpy() if valid is None else values[valid].numpy()
    return np.array([np.percentile(sel, q) for q in qs], dtype=np.float32)


def _same_bits(got, expected):
    got = got.numpy().astype(np.float32)
    assert np.array_equal(got.view(np.int32), expected.view(np.int32)), (got, expected)


@pytest.mark.parametrize("kind", ["random", "ties", "negative", "one", "all_equal", "wide"])
@pytest.mark.parametrize("masked", [False, True])
def test_percentile_is_numpy_bit_for_bit(kind, masked):
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    if kind == "random":
        x = torch.rand(3, 37, 29, generator=g)
    elif kind == "ties":
        x = torch.randint(0, 5, (2, 50, 21), generator=g).float() / 4
    elif kind == "negative":
        x = torch.randn(5001, generator=g) * 1e3
    elif kind == "one":
        x = torch.tensor([0.7314])
    elif kind == "all_equal":
        x = torch.full((4, 9), 1.25)
    else:  # magnitudes from subnormal to huge, both signs, several radix digits apart
        x = torch.cat([torch.tensor([1e-40, -1e-40, 3e38, -3e38, 0.0]), torch.randn(300, generator=g).exp() ** 8])
    valid = None
    if masked and x.numel() > 1:
        valid = torch.rand(x.shape, generator=g) < 0.6
        valid.view(-1)[0] = True
    got = ops.percentile(x, QS, valid, impl="triton")
    _same_bits(got, _numpy(x, valid, QS))
    _same_bits(ops.percentile(x, 37.5, valid, impl="triton").reshape(1), _numpy(x, valid, [37.5]))


def test_percentile_empty_nan_and_half_precision():
    x = torch.rand(40)
    empty = torch.zeros(40, dtype=torch.bool)
    assert torch.equal(ops.percentile(x, [5.0, 95.0], empty, impl="triton"), torch.zeros(2))
    y = x.clone()
    y[3] = float("nan")
    assert torch.isnan(ops.percentile(y, [5.0, 95.0], impl="triton")).all()
    keep = torch.ones(40, dtype=torch.bool)
    keep[3] = False  # NaN outside the selection takes no part
    _same_bits(ops.percentile(y, [5.0, 95.0], keep, impl="triton"), _numpy(y, keep, [5.0, 95.0]))
    for dtype in (torch.float16, torch.bfloat16):
        h = torch.randn(333).to(dtype)
        got = ops.percentile(h, QS, impl="triton")
        assert got.dtype == dtype
        assert torch.equal(got, ops.percentile(h, QS, impl="reference"))


def test_entropy_and_its_thresholds():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 21, 13, 17, generator=g) * 3
    valid = torch.rand(3, 13, 17, generator=g) < 0.8
    qs = [20.0, 80.0, 96.25]
    ent, thresholds = ops.entropy_percentile(logits, qs, valid, impl="triton")
    exact = ref.entropy(logits.double())
    err = (ent.double() - exact).abs().max().item()
    base = (ref.entropy(logits).double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, (err, base)
    assert ent.dtype == torch.float32 and thresholds.dtype == torch.float32
    _same_bits(thresholds, _numpy(ent, valid, qs))
    ent16, _ = ops.entropy_percentile(logits.bfloat16(), qs, valid, impl="triton")
    assert ent16.dtype == torch.float32
    assert (ent16 - ref.entropy(logits.bfloat16().float())).abs().max() < 1e-5


@pytest.mark.parametrize("c", [1, 4, 19, 21])
def test_rank_mask_matches_the_stable_sort_reference(c):
    g = torch.Generator().manual_seed(c)
    prob = torch.softmax(torch.randn(2, c, 5, 7, generator=g), 1)
    prob[0, :, 0, 0] = 1.0 / c  # a pixel of complete ties
    if c > 3:
        prob[1, 2] = prob[1, 1]  # tied pairs
    for low, high in ((3, 20), (0, 1), (1, 2), (2, 30)):
        unl, lab = ops.rank_mask(prob, low, high, impl="triton")
        r_unl, r_lab = ref.rank_mask(prob.double(), low, high)
        assert torch.equal(unl, r_unl) and torch.equal(lab, r_lab), (low, high)
    if c == 21:
        assert (ops.rank_mask(prob, 3, 20, impl="triton")[0].sum(1) == 17).all()  # exactly r_h - r_l


def test_float64_runs_the_reference_under_auto_and_is_refused_under_triton():
    x = torch.rand(10, dtype=torch.float64)
    assert ops.percentile(x, 50.0).dtype == torch.float64
    with pytest.raises(NotImplementedError, match="float64"):
        ops.percentile(x, 50.0, impl="triton")


def test_opcheck_and_fullgraph_compile():
    logits = torch.randn(2, 5, 4, 6)
    valid = torch.rand(2, 4, 6) > 0.2
    s = torch.ops.semiseg
    for op, args in ((s.entropy_percentile.default, (logits, [10.0, 90.0], valid, "triton")),
                     (s.percentile.default, (logits, [25.0, 75.0], None, "triton")),
                     (s.rank_mask.default, (logits.softmax(1), 1, 3, "triton"))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    def step(logits, valid):
        ent, (t_drop, t_low, t_high) = ops.entropy_percentile(logits, [80.0, 20.0, 80.0], valid, impl="triton")
        unl, lab = ops.rank_mask(logits.softmax(1), 3, 20, impl="triton")
        return (ent >= t_drop).sum() + unl.sum() + lab.sum() + (t_low <= t_high)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert compiled(logits, valid) == step(logits, valid)


@pytest.mark.gpu
def test_u2pl_sizes_on_gpu_without_host_syncs():
    logits = torch.randn(4, 21, 513, 513, device="cuda") * 3
    valid = torch.rand(4, 513, 513, device="cuda") < 0.9
    prob = torch.softmax(torch.randn(8, 21, 129, 129, device="cuda"), 1)
    ops.entropy_percentile(logits, [80.0, 20.0, 80.0], valid)  # warm-up: compile the kernels
    ops.rank_mask(prob, 3, 20)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ent, thresholds = ops.entropy_percentile(logits, [80.0, 20.0, 80.0], valid)
        unl, lab = ops.rank_mask(prob, 3, 20)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _same_bits(thresholds.cpu(), _numpy(ent.cpu(), valid.cpu(), [80.0, 20.0, 80.0]))
    r_unl, r_lab = ref.rank_mask(prob, 3, 20)
    assert torch.equal(unl, r_unl) and torch.equal(lab, r_lab)
