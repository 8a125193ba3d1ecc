"""Fused entropy / exact percentile / rank-mask kernels (kernels/entropy_percentile.py).

Percentiles are compared with ``numpy.percentile`` bit for bit on the very float32 values the kernel
selected from (the entropy map it returned), the entropy with the float64 reference by the DESIGN
tolerance rule, and the rank masks with the stable-sort reference exactly. CPU: Triton interpreter.
"""
import importlib
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


# -- the fused single pass (teacher_stats) ------------------------------------------------------

ALL_OUTPUTS = dict(entropy=True, max_prob=True, argmax=True, prob=True, rank=True)


def _within_rule(got, exact, same_precision, name, floor=1e-6):
    """DESIGN tolerance rule: error against float64 <= 2x the fp32 reference's error + a floor.
    The floor covers outputs the fp32 reference happens to get exactly (saturated softmax)."""
    err = (got.double() - exact).abs().max().item()
    base = (same_precision.double() - exact).abs().max().item()
    assert err <= 2 * base + floor, (name, err, base)


def _check_teacher_stats(logits, size, first_image=0, low=3, high=20):
    got = ops.teacher_stats(logits, size, first_image=first_image, low_rank=low, high_rank=high,
                            impl="triton", **ALL_OUTPUTS)
    exact = ref.teacher_stats(logits.double(), size, first_image, low, high)
    fp32 = ref.teacher_stats(logits.float(), size, first_image, low, high)
    for name in ("entropy", "max_prob", "prob"):
        out = getattr(got, name)
        assert out.dtype == torch.float32 and out.shape == exact[name].shape, name
        _within_rule(out, exact[name], fp32[name], name)
    # arg-max: exact wherever the float64 top two logits are apart by more than fp32 rounding of
    # the interpolation (|logits| < 30 here, so 1e-4 is ~100 ulps); exact ties are the callers'
    up = exact["argmax"]
    top2 = torch.topk(F.interpolate(logits[first_image:].double(), size, mode="bilinear",
                                    align_corners=True) if tuple(size) != tuple(logits.shape[-2:])
                      else logits[first_image:].double(), min(2, logits.shape[1]), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > 1e-4) if logits.shape[1] > 1 else torch.ones_like(up, dtype=torch.bool)
    assert got.argmax.dtype == torch.int64 and torch.equal(got.argmax[clear], up[clear])
    # rank bits: exactly the stable-sort masks of the probabilities the kernel itself produced
    r_unl, r_lab = ref.rank_mask(got.prob.double(), low, high)
    assert torch.equal(got.unlabeled, r_unl) and torch.equal(got.labeled, r_lab)
    return got, clear


@pytest.mark.parametrize("case", ["up", "same_grid", "down", "one_class", "first_image", "one_row", "bf16"])
def test_teacher_stats_matches_the_float64_reference(case):
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    shape, size, first = (2, 5, 7, 9), (25, 33), 0
    if case == "same_grid":
        size = (7, 9)
    elif case == "down":
        size = (4, 5)
    elif case == "one_class":
        shape = (2, 1, 7, 9)
    elif case == "first_image":
        shape, first = (3, 5, 7, 9), 2
    elif case == "one_row":  # a 1-pixel-high source: the clamped neighbour and a 0 scale
        shape, size = (1, 4, 1, 6), (3, 11)
    logits = torch.randn(shape, generator=g) * 3
    if case == "bf16":
        logits = logits.bfloat16()
    _, clear = _check_teacher_stats(logits, size, first)
    assert clear.float().mean() > 0.99  # random logits: the arg-max check covers nearly every pixel


def test_teacher_stats_ties_and_degenerate_grids():
    # all classes equal everywhere: uniform softmax, class 0 wins every arg-max, ranks by index
    flat = torch.zeros(1, 21, 3, 4)
    got, _ = _check_teacher_stats(flat, (9, 10))
    assert (got.argmax == 0).all()
    assert torch.equal(got.unlabeled[0, :, 0, 0], (torch.arange(21) >= 3) & (torch.arange(21) < 20))
    # classes 1 and 3 tie for the maximum at every source pixel, so at every output pixel too
    # (both interpolate the same four values with the same weights): the lower index wins
    logits = torch.randn(2, 5, 4, 6) - 10
    logits[:, 3] = logits[:, 1] = 2.0 + torch.rand(2, 4, 6)
    logits[:, 3] = logits[:, 1]
    got = ops.teacher_stats(logits, (11, 7), impl="triton")
    assert (got.argmax == 1).all()
    # one output pixel (scale 0: the top-left source pixel), and no output-grid image at all
    one = ops.teacher_stats(logits, (1, 1), impl="triton")
    assert torch.equal(one.argmax, logits[:, :, :1, :1].argmax(1))
    none = ops.teacher_stats(logits, (5, 5), first_image=2, prob=True, impl="triton")
    assert none.entropy.shape == (0, 5, 5)
    assert (none.prob - logits.softmax(1)).abs().max() < 1e-6
    # torch.argmax's rule where the maximum is not a number: all -inf -> 0, a NaN class wins
    odd = torch.randn(1, 5, 2, 3)
    odd[0, :, 0, 0] = float("-inf")
    odd[0, 3, 1, 2] = float("nan")
    odd[0, 1:, 0, 1] = float("-inf")
    got = ops.teacher_stats(odd, (2, 3), impl="triton").argmax
    assert torch.equal(got, odd.argmax(1)) and got[0, 0, 0] == 0 and got[0, 1, 2] == 3


def test_u2pl_single_pass_equals_the_path_it_replaced():
    # U2PL's augment before: F.interpolate + entropy_percentile, softmax, rank_mask, each separate;
    # now one teacher_stats pass (mixed images only at crop size) and one percentile
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 21, 5, 6, generator=g) * 3  # [2 labeled; 2 mixed] at 1/4
    size, n_l, qs = (17, 21), 2, [84.0, 16.0, 84.0]
    valid = torch.rand(2, *size, generator=g) < 0.8
    stats = ops.teacher_stats(logits, size, first_image=n_l, max_prob=False, argmax=False, prob=True,
                              rank=True, impl="triton")
    thresholds = ops.percentile(stats.entropy, qs, valid, impl="triton")
    before_ent, before_t = ops.entropy_percentile(
        F.interpolate(logits[n_l:], size, mode="bilinear", align_corners=True), qs, valid, impl="reference")
    before_prob = logits.softmax(1)
    # float rounding only: the interpolation and exp differ from PyTorch's CPU kernels by ulps
    assert (stats.entropy - before_ent).abs().max() < 1e-5
    assert (thresholds - before_t).abs().max() < 1e-5
    assert (stats.prob - before_prob).abs().max() < 1e-6
    agree = (stats.unlabeled == ops.rank_mask(before_prob, 3, 20, impl="reference")[0]).float().mean()
    assert agree > 0.999  # only probabilities within an ulp of each other may swap ranks


def test_teacher_stats_returns_only_what_was_asked():
    logits = torch.randn(2, 3, 4, 5)
    got = ops.teacher_stats(logits, (6, 7), entropy=False, max_prob=False, impl="triton")
    assert got.entropy is None and got.max_prob is None and got.prob is None and got.unlabeled is None
    assert got.argmax.shape == (2, 6, 7)
    for impl in ("triton", "reference"):
        only_rank = ops.teacher_stats(logits, entropy=False, max_prob=False, argmax=False, rank=True,
                                      low_rank=1, high_rank=2, impl=impl)
        assert only_rank.prob is None and only_rank.argmax is None
        assert torch.equal(only_rank.labeled, logits.argmax(1, keepdim=True) == torch.arange(3).view(1, 3, 1, 1))


def test_teacher_stats_validates_its_arguments():
    logits = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="size"):
        ops.teacher_stats(logits, (0, 4))
    with pytest.raises(ValueError, match="size"):
        ops.teacher_stats(logits, (4,))
    with pytest.raises(ValueError, match="first_image"):
        ops.teacher_stats(logits, first_image=3)
    with pytest.raises(ValueError, match="at least one output"):
        ops.teacher_stats(logits, entropy=False, max_prob=False, argmax=False)
    with pytest.raises(ValueError, match="low_rank"):
        ops.teacher_stats(logits, rank=True, low_rank=4, high_rank=2)
    with pytest.raises(ValueError, match="logits"):
        ops.teacher_stats(logits[0])


def test_entropy_percentile_at_an_output_size():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 5, 7, generator=g) * 2
    valid = torch.rand(2, 13, 19, generator=g) < 0.7
    qs = [80.0, 20.0, 80.0]
    ent, thresholds = ops.entropy_percentile(logits, qs, valid, size=(13, 19), impl="triton")
    exact = ref.entropy(F.interpolate(logits.double(), (13, 19), mode="bilinear", align_corners=True))
    fp32 = ref.entropy(F.interpolate(logits, (13, 19), mode="bilinear", align_corners=True))
    _within_rule(ent, exact, fp32, "entropy")
    _same_bits(thresholds, _numpy(ent, valid, qs))
    with pytest.raises(ValueError, match="valid"):
        ops.entropy_percentile(logits, qs, valid, impl="triton")  # valid is at the output size


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_check_nan_raises_naming_the_argument(impl):
    x = torch.rand(3, 20)
    x[1, 4] = float("nan")
    with pytest.raises(ValueError, match="values: a percentile is NaN"):
        ops.percentile(x, [10.0, 50.0], check_nan=True, impl=impl)
    keep = torch.ones(3, 20, dtype=torch.bool)
    keep[1, 4] = False  # NaN outside the selection is no error
    _same_bits(ops.percentile(x, [10.0, 50.0], keep, check_nan=True, impl=impl), _numpy(x, keep, [10.0, 50.0]))
    logits = torch.randn(1, 3, 4, 4)
    logits[0, 1, 2, 2] = float("nan")
    for size in (None, (6, 5)):
        with pytest.raises(ValueError, match="logits: a percentile is NaN"):
            ops.entropy_percentile(logits, 50.0, size=size, check_nan=True, impl=impl)


# numpy's own percentile interpolates between infinities (inf - inf) to give its NaN: expected
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:numpy")
def test_numpy_scalars_and_infinities():
    x = torch.tensor([[1.0, float("inf"), 3.0, -2.0]])
    for q in (np.float32(50), np.int64(50), [np.float32(10), np.float64(90)]):
        _same_bits(ops.percentile(x, q, impl="triton").reshape(-1), _numpy(x, None, q if isinstance(q, list) else [q]))
    # numpy's lerp between 3 and inf at q = 100 * 2.5 / 3 is inf; between inf and inf it is NaN
    # (inf - inf), which check_nan reports as such
    both = torch.tensor([float("inf"), float("inf"), 1.0])
    _same_bits(ops.percentile(both, [50.0, 90.0], impl="triton"), _numpy(both, None, [50.0, 90.0]))


# -- the CUDA C++ selection (csrc/radix_select.cu) ------------------------------------------------

def _kernels():
    return importlib.import_module("semiseg_fast.kernels.entropy_percentile")


def test_cuda_select_falls_back_to_triton_with_one_warning(monkeypatch, device):
    build = importlib.import_module("semiseg_fast.csrc.build")

    def no_nvcc(name):
        raise OSError("nvcc not found")

    monkeypatch.setattr(build, "_build", no_nvcc)
    monkeypatch.setattr(build, "_BUILT", {})
    x = torch.rand(3, 41, device=device)
    with _kernels().use_radix_select("cuda"):
        with pytest.warns(RuntimeWarning, match="radix_select.cu is not available.*nvcc not found") as seen:
            got = ops.percentile(x, QS, impl="triton")  # CUDA tensors ask for the build here
            assert build.load("radix_select") is None  # CPU ones here
        assert len(seen) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the answer is kept: no second warning
            again = ops.percentile(x, QS, impl="triton")
    _same_bits(got.cpu(), _numpy(x.cpu(), None, QS))
    assert torch.equal(got, again)


def test_radix_select_switch_is_validated(monkeypatch):
    k = _kernels()
    assert k.radix_select() in k.RADIX_SELECTS
    with pytest.raises(ValueError, match="name"):
        with k.use_radix_select("cub"):
            pass
    monkeypatch.setenv(k.RADIX_SELECT_ENV, "sort")
    with pytest.raises(ValueError, match=k.RADIX_SELECT_ENV):
        k.radix_select()
    with k.use_radix_select("cuda"):  # the context wins over the environment
        assert k.radix_select() == "cuda"


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
                     (s.rank_mask.default, (logits.softmax(1), 1, 3, "triton")),
                     (s.teacher_stats.default, (logits, [7, 5], 1, True, True, True, True, True, 3, 20, "triton")),
                     (s.teacher_stats.default, (logits, [4, 6], 0, False, False, True, False, True, 1, 2, "triton")),
                     (s.teacher_stats.default, (logits.double(), [3, 3], 0, True, False, False, True, False, 1, 2,
                                                "auto"))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    def step(logits, valid):
        ent, (t_drop, t_low, t_high) = ops.entropy_percentile(logits, [80.0, 20.0, 80.0], valid, impl="triton")
        unl, lab = ops.rank_mask(logits.softmax(1), 3, 20, impl="triton")
        stats = ops.teacher_stats(logits, (7, 9), prob=True, rank=True, impl="triton")
        up_ent, up_t = ops.entropy_percentile(logits, [50.0], size=(7, 9), impl="triton")
        return ((ent >= t_drop).sum() + unl.sum() + lab.sum() + (t_low <= t_high) + stats.argmax.sum()
                + stats.unlabeled.sum() + (up_ent >= up_t).sum())

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


def _no_sync(fn):
    """Run fn with every host synchronisation an error (warm it up first: compiles may sync)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_teacher_stats_at_u2pl_voc_size_on_gpu_without_host_syncs():
    # U2PL VOC: [4 labeled; 4 mixed] x 21 x 129^2 teacher logits, entropy of the mixed at 513^2
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(8, 21, 129, 129, device="cuda", generator=g) * 3
    valid = torch.rand(4, 513, 513, device="cuda", generator=g) < 0.9
    qs = [80.0, 20.0, 80.0]

    def step():
        stats = ops.teacher_stats(logits, (513, 513), first_image=4, prob=True, rank=True)
        return stats, ops.percentile(stats.entropy, qs, valid)

    stats, thresholds = _no_sync(step)
    exact = ref.teacher_stats(logits.double(), (513, 513), 4)
    fp32 = ref.teacher_stats(logits, (513, 513), 4)
    for name in ("entropy", "max_prob", "prob"):
        _within_rule(getattr(stats, name), exact[name], fp32[name], name)
    assert (stats.argmax != exact["argmax"]).float().mean() < 1e-4  # near-ties only
    _same_bits(thresholds.cpu(), _numpy(stats.entropy.cpu(), valid.cpu(), qs))
    r_unl, r_lab = ref.rank_mask(stats.prob, 3, 20)
    assert torch.equal(stats.unlabeled, r_unl) and torch.equal(stats.labeled, r_lab)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "ties", "negative", "one", "all_equal", "wide", "empty", "nan"])
def test_cuda_select_is_numpy_bit_for_bit_on_gpu(kind):
    if _kernels()._cuda_select() is None:
        pytest.skip("csrc/radix_select.cu cannot be built here (the warning says why)")
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    x = {"random": lambda: torch.rand(4, 513, 513, generator=g),
         "ties": lambda: torch.randint(0, 7, (3, 1000, 77), generator=g).float() / 4,
         "negative": lambda: torch.randn(100_003, generator=g) * 1e3,
         "one": lambda: torch.tensor([0.7314]),
         "all_equal": lambda: torch.full((257, 3), -1.25),
         "wide": lambda: torch.cat([torch.tensor([1e-40, -1e-40, 3e38, -3e38, 0.0]),
                                    torch.randn(3000, generator=g).exp() ** 8]),
         "empty": lambda: torch.rand(50, generator=g),
         "nan": lambda: torch.rand(999, generator=g)}[kind]()
    valid = torch.rand(x.shape, generator=g) < 0.7
    valid.view(-1)[0] = True
    if kind == "empty":
        valid[:] = False
    if kind == "nan":
        x[5] = float("nan")
        valid[5] = True
    qs = QS + [37.5, 62.5, 1e-5, 99.99999]
    xd, vd = x.cuda(), valid.cuda()
    with _kernels().use_radix_select("cuda"):
        masked = _no_sync(lambda: ops.percentile(xd, qs, vd, impl="triton")).cpu()
        whole = _no_sync(lambda: ops.percentile(xd, qs, impl="triton")).cpu()
    if kind == "empty":
        assert torch.equal(masked, torch.zeros(len(qs)))
    elif kind == "nan":
        assert torch.isnan(masked).all() and torch.isnan(whole).all()
        return
    else:
        _same_bits(masked, _numpy(x, valid, qs))
    _same_bits(whole, _numpy(x, None, qs))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("select", ["triton", "cuda"])
def test_percentile_beyond_2_31_elements_on_gpu(select):
    # 0..1023 each 2^21 + 1 times, then one more 1023: n = 2^31 + 1025. The 0, 25, 50 and 100th
    # percentiles fall on integral ranks r = (n - 1) q = 0, 256 (2^21 + 1), ..., n - 1, so they are
    # the order statistics themselves: 0, 256, 512 and 1023.
    if select == "cuda" and _kernels()._cuda_select() is None:
        pytest.skip("csrc/radix_select.cu cannot be built here (the warning says why)")
    rows = 2**21 + 1
    values = torch.cat((torch.arange(1024, dtype=torch.float32, device="cuda").repeat(rows),
                        torch.tensor([1023.0], device="cuda")))
    assert values.numel() > 2**31
    with _kernels().use_radix_select(select):
        got = ops.percentile(values, [0.0, 25.0, 50.0, 100.0], impl="triton")
    assert got.tolist() == [0.0, 256.0, 512.0, 1023.0]
