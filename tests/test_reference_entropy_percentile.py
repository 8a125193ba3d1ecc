"""Reference entropy, numpy-exact percentile and class-rank masks (U2PL)."""
import math

import numpy as np
import pytest
import torch

from semiseg_fast.reference import (
    class_rank,
    entropy,
    percentile,
    rank_mask,
    teacher_stats,
)


def _bits(x):
    return np.asarray(x).tobytes()


def _sample(rng, kind):
    n = int(rng.integers(1, 120))
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 4)
    if kind == 1:  # ties and duplicates
        x = np.round(x / np.abs(x).max() * 4)
    elif kind == 2:  # all equal
        x = np.full(n, rng.standard_normal())
    elif kind == 3:  # entropies: non-negative, many near-equal small values
        x = np.abs(x) * 1e-3
    x = x.astype(np.float32)
    x[x == 0] = 0.0  # numpy leaves the order of -0.0 and +0.0 unspecified; avoid both at once
    return x


def test_entropy_matches_loops():
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 4
    logits[0, :, 0, 0] = torch.tensor([300.0, 0.0, 0.0, 0.0, 0.0])  # saturated softmax
    got = entropy(logits)
    assert got.shape == (2, 3, 4) and got.dtype == torch.float64
    L = logits.tolist()
    for b in range(2):
        for i in range(3):
            for j in range(4):
                v = [L[b][c][i][j] for c in range(5)]
                top = max(v)
                z = math.fsum(math.exp(x - top) for x in v)
                probs = [math.exp(x - top) / z for x in v]
                want = -math.fsum(p * math.log(p + 1e-10) for p in probs)
                assert got[b, i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert entropy(logits.float()).dtype == torch.float32


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_percentile_is_bit_exact_with_numpy_float32(kind):
    rng = np.random.default_rng(kind)
    for _ in range(150):
        x = _sample(rng, kind)
        qs = [float(v) for v in rng.uniform(0, 100, 4)] + [0.0, 100.0, 50.0, 99.9, 1e-7]
        got = percentile(torch.from_numpy(x), qs)
        assert got.dtype == torch.float32 and got.shape == (len(qs),)
        want = np.array([np.percentile(x, q) for q in qs])
        assert want.dtype == np.float32
        assert _bits(got.numpy()) == _bits(want), (x, qs)
        scalar = percentile(torch.from_numpy(x), qs[0])
        assert scalar.dim() == 0 and _bits(scalar.numpy()) == _bits(want[0])


def test_percentile_single_element_and_integer_q():
    x = torch.tensor([3.25], dtype=torch.float32)
    for q in (0, 37, 100, 0.0, 62.5):
        assert percentile(x, q).item() == 3.25
    v = np.array([5.0, -1.0, 2.0, 2.0, 9.0], dtype=np.float32)
    assert _bits(percentile(torch.from_numpy(v), 30).numpy()) == _bits(np.percentile(v, 30))


def test_percentile_float64_matches_numpy_array_q():
    rng = np.random.default_rng(7)
    for _ in range(50):
        x = rng.standard_normal(int(rng.integers(1, 90)))
        qs = np.concatenate([rng.uniform(0, 100, 5), [0.0, 100.0]])
        got = percentile(torch.from_numpy(x), torch.from_numpy(qs))
        assert got.dtype == torch.float64
        assert _bits(got.numpy()) == _bits(np.percentile(x, qs))


def test_percentile_over_valid_elements_only():
    rng = np.random.default_rng(3)
    for _ in range(40):
        x = rng.standard_normal((3, 5, 7)).astype(np.float32)
        valid = rng.random((3, 5, 7)) < 0.4
        valid.flat[int(rng.integers(0, valid.size))] = True
        x[~valid] = np.nan if rng.random() < 0.5 else 1e30  # never read
        qs = [float(v) for v in rng.uniform(0, 100, 3)]
        got = percentile(torch.from_numpy(x), qs, valid=torch.from_numpy(valid))
        want = np.array([np.percentile(x[valid], q) for q in qs])
        assert _bits(got.numpy()) == _bits(want)


def test_naive_lerp_would_miss_bits():
    # Guards the test's power: the uncorrected a + (b - a) g differs from numpy somewhere.
    rng = np.random.default_rng(11)
    misses = 0
    for _ in range(400):
        x = np.sort(rng.standard_normal(int(rng.integers(2, 60))).astype(np.float32))
        q = float(rng.uniform(0, 100))
        r = (x.size - 1) * (q / 100)
        lo = math.floor(r)
        if lo + 1 >= x.size:
            continue
        naive = x[lo] + (x[lo + 1] - x[lo]) * np.float32(r - lo)
        exact = np.percentile(x, q)
        assert _bits(percentile(torch.from_numpy(x), q).numpy()) == _bits(exact)
        misses += int(naive != exact)
    assert misses > 0


def test_percentile_errors_name_the_argument():
    x = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="values"):
        percentile(x, 50.0)
    ok = torch.tensor([True, False, True])
    assert percentile(x, 50.0, valid=ok).item() == 1.5  # NaN outside the valid set is ignored
    with pytest.raises(ValueError, match="valid"):
        percentile(x, 50.0, valid=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="values"):
        percentile(torch.empty(0), 50.0)
    with pytest.raises(ValueError, match="q"):
        percentile(torch.ones(3), 100.5)
    with pytest.raises(ValueError, match="q"):
        percentile(torch.ones(3), [10.0, -1.0])
    with pytest.raises(ValueError, match="valid"):
        percentile(torch.ones(3), 5.0, valid=torch.ones(4, dtype=torch.bool))


def _brute_rank(prob):
    """rank(c) = #{c': p_c' > p_c} + #{c' < c: p_c' = p_c}, by explicit loops."""
    B, C, H, W = prob.shape
    P = prob.tolist()
    rank = torch.empty(B, C, H, W, dtype=torch.int64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                v = [P[b][c][i][j] for c in range(C)]
                for c in range(C):
                    rank[b, c, i, j] = sum(v[d] > v[c] or (v[d] == v[c] and d < c)
                                           for d in range(C))
    return rank


def test_rank_and_masks_with_ties():
    C = 21
    prob = torch.softmax(torch.randn(2, C, 3, 5, dtype=torch.float64) * 3, dim=1)
    prob = torch.round(prob * 8) / 8  # many exact ties, including many zeros (underflow-like)
    prob[1, :, 2, 4] = 0.0  # an all-tied pixel
    rank = class_rank(prob)
    want = _brute_rank(prob)
    assert torch.equal(rank, want)
    for c in range(C):  # each pixel's ranks are a permutation of 0..C-1
        assert torch.equal(torch.sort(rank, dim=1).values[:, c], torch.full((2, 3, 5), c))
    assert torch.equal(rank[1, :, 2, 4], torch.arange(C))
    unlab, lab = rank_mask(prob)
    assert unlab.dtype == torch.bool and unlab.shape == prob.shape
    assert torch.equal(unlab, (want >= 3) & (want < 20))
    assert torch.equal(lab, want < 3)
    unlab, lab = rank_mask(prob.float(), low_rank=1, high_rank=4)
    assert torch.equal(unlab, (want >= 1) & (want < 4)) and torch.equal(lab, want < 1)


def test_rank_mask_validates_ranks():
    with pytest.raises(ValueError, match="low_rank"):
        rank_mask(torch.rand(1, 4, 2, 2), low_rank=5, high_rank=3)


def _bilinear_align_corners(x, out_h, out_w):
    """[C, h, w] -> [C, out_h, out_w] by explicit loops: source = dst (in - 1) / (out - 1)."""
    C, h, w = x.shape
    out = torch.empty(C, out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = math.floor(sy)
        y1, ty = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = math.floor(sx)
            x1, tx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - ty) * ((1 - tx) * x[:, y0, x0] + tx * x[:, y0, x1])
                            + ty * ((1 - tx) * x[:, y1, x0] + tx * x[:, y1, x1]))
    return out


def test_teacher_stats_is_u2pl_written_out():
    logits = torch.randn(3, 4, 3, 5, dtype=torch.float64) * 3
    logits[2, 1] = logits[2, 3] = 5.0  # a tied maximum everywhere in image 2: the lower class wins
    got = teacher_stats(logits, (7, 4), first_image=1, low_rank=1, high_rank=3)
    for b in (1, 2):
        up = _bilinear_align_corners(logits[b], 7, 4)
        p = torch.softmax(up, 0)
        want = -(p * torch.log(p + 1e-10)).sum(0)
        assert torch.allclose(got["entropy"][b - 1], want, rtol=1e-12, atol=1e-14)
        assert torch.allclose(got["max_prob"][b - 1], p.max(0).values, rtol=1e-12, atol=0)
        # arg-max by a Python scan for the first maximum
        for i in range(7):
            for j in range(4):
                col = up[:, i, j].tolist()
                assert got["argmax"][b - 1, i, j].item() == col.index(max(col))
    assert (got["argmax"][1] == 1).all()
    assert torch.equal(got["prob"], torch.softmax(logits, 1))
    rank = _brute_rank(got["prob"])
    assert torch.equal(got["unlabeled"], (rank >= 1) & (rank < 3)) and torch.equal(got["labeled"], rank < 1)
    same = teacher_stats(logits, outputs=("entropy", "argmax"))
    assert set(same) == {"entropy", "argmax"} and torch.equal(same["entropy"], entropy(logits))
    with pytest.raises(ValueError, match="outputs"):
        teacher_stats(logits, outputs=("entropy", "logits"))
    with pytest.raises(ValueError, match="logits"):
        teacher_stats(logits[0])
