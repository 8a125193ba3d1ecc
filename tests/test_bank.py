"""Class memory bank: ring-buffer enqueue against a per-class deque model, CTT admission,
segmented prototypes, device-side negative sampling, checkpoint round trip, and the no-sync rule."""
from __future__ import annotations

import collections
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from semiseg_fast.methods.bank import (
    ClassMemoryBank,
    ctt_admission_k,
    prototype_sums,
    prototypes,
    sample_masked,
    topk_admission,
    uniform_indices,
)


class DequeModel:
    """The semantics the ring must match: key-by-key pushes into deque(maxlen=cap) per class."""

    def __init__(self, caps):
        self.queues = [collections.deque(maxlen=c) for c in caps]

    def push(self, keys, labels, valid=None, order=None):
        n = len(labels)
        idx = list(range(n))
        if order is not None:
            idx.sort(key=lambda i: (order[i], i))
        for i in idx:
            lab = labels[i]
            if 0 <= lab < len(self.queues) and (valid is None or valid[i]):
                self.queues[lab].append(keys[i])


def _tagged_keys(n, dim, first_id):
    """Keys whose column 0 is a unique id, so order and identity errors are visible."""
    keys = torch.randn(n, dim)
    keys[:, 0] = torch.arange(first_id, first_id + n, dtype=torch.float32)
    return keys


def _assert_matches(bank, model):
    for c, q in enumerate(model.queues):
        got = bank.entries(c)
        want = torch.stack(list(q)) if q else torch.zeros(0, bank.dim)
        assert torch.equal(got, want.to(got.dtype)), f"class {c}"
        assert int(bank.fill[c]) == len(q)
    mask = bank.valid_mask()
    assert mask.sum(1).tolist() == [len(q) for q in model.queues]
    assert bool(bank.is_full()) == all(len(q) == q.maxlen for q in model.queues)
    # Never-written and padding slots must stay zero: kernels masking by fill may still read them.
    assert torch.count_nonzero(bank.keys()[~mask]) == 0


class _ReversedScatter(TorchFunctionMode):
    """Applies index_copy_ lanes last-to-first: a device may resolve duplicate indices in any
    order, so keep-last must not depend on the order the writes land in."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "index_copy_":
            target, dim, index, source = args
            return func(target, dim, index.flip(0), source.flip(0))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scatter_order", ["forward", "reversed"])
def test_enqueue_matches_deque_random_sequences(scatter_order):
    if scatter_order == "reversed":
        with _ReversedScatter():
            _random_sequences()
    else:
        _random_sequences()


def _random_sequences():
    rng = random.Random(1)
    caps = [5, 3, 8, 1, 6]
    bank = ClassMemoryBank(len(caps), 4, caps)
    model = DequeModel(caps)
    next_id = 0
    for step in range(60):
        n = rng.choice([0, 1, 2, 5, 9, 17, 30])
        keys = _tagged_keys(n, 4, next_id)
        next_id += n
        # -1 and 255 are ignore labels; 5 is one past the last class.
        labels = [rng.choice([0, 1, 2, 3, 4, 4, 2, -1, 255, 5]) for _ in range(n)]
        valid = [rng.random() < 0.8 for _ in range(n)] if step % 2 else None
        offered = bank.enqueue(keys, torch.tensor(labels, dtype=torch.int64),
                               None if valid is None else torch.tensor(valid, dtype=torch.bool))
        model.push(list(keys), labels, valid)
        want_offered = [sum(1 for i, lab in enumerate(labels)
                            if lab == c and (valid is None or valid[i])) for c in range(len(caps))]
        assert offered.tolist() == want_offered
        _assert_matches(bank, model)


def test_single_call_over_capacity_keeps_last_in_input_order():
    caps = [4, 7, 2]
    bank = ClassMemoryBank(3, 3, caps)
    model = DequeModel(caps)
    # Pre-fill partly so the oversized call starts mid-ring.
    warm = _tagged_keys(5, 3, 0)
    warm_labels = [0, 1, 1, 2, 0]
    bank.enqueue(warm, torch.tensor(warm_labels))
    model.push(list(warm), warm_labels)
    labels = [0] * 11 + [1] * 3 + [2] * 9
    random.Random(3).shuffle(labels)
    keys = _tagged_keys(len(labels), 3, 100)
    with _ReversedScatter():
        bank.enqueue(keys, torch.tensor(labels))
    model.push(list(keys), labels)
    _assert_matches(bank, model)
    # ptr = next write slot; the oldest survivor sits there once a class is full.
    assert bank.ptr.tolist() == [(2 + 11) % 4, (2 + 3) % 7, (1 + 9) % 2]
    assert bank.fill.tolist() == [4, 5, 2]


def test_empty_and_all_invalid_calls_leave_the_bank_unchanged():
    bank = ClassMemoryBank(2, 3, [3, 2])
    bank.enqueue(torch.randn(9, 3), torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 1]))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.enqueue(torch.randn(0, 3), torch.zeros(0, dtype=torch.int64))
    # All-invalid calls hit the path that writes a junk row and restores it.
    bank.enqueue(torch.full((6, 3), float("nan")), torch.tensor([0, 1, -1, 255, 0, 1]),
                 torch.tensor([False, False, True, True, False, False]))
    bank.enqueue(torch.randn(4, 3), torch.tensor([-1, -1, 7, 2]))
    for k, v in bank.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_invalid_rows_with_nan_do_not_reach_the_bank():
    bank = ClassMemoryBank(3, 2, 4)
    keys = torch.randn(8, 2)
    keys[1] = float("nan")
    keys[5] = float("inf")
    bank.enqueue(keys, torch.tensor([0, 1, 2, 0, 1, -1, 2, 0]),
                 torch.tensor([True, False, True, True, True, True, True, True]))
    assert torch.isfinite(bank.keys()).all()
    assert bank.fill.tolist() == [3, 1, 2]


def test_order_argument_sets_the_within_class_sequence():
    caps = [3, 5]
    bank = ClassMemoryBank(2, 2, caps)
    model = DequeModel(caps)
    for call in range(4):
        keys = _tagged_keys(7, 2, 10 * call)
        labels = [0, 1, 0, 0, 1, 0, 1]
        order = [5, 0, 5, -3, 2, 1, 2]  # ties resolve by input index
        bank.enqueue(keys, torch.tensor(labels), order=torch.tensor(order))
        model.push(list(keys), labels, order=order)
        _assert_matches(bank, model)


def test_enqueue_detaches_casts_and_accepts_int32_labels():
    bank = ClassMemoryBank(2, 3, 4, dtype=torch.float64)
    keys = torch.randn(3, 3, requires_grad=True)
    bank.enqueue(keys * 2, torch.tensor([1, 0, 1], dtype=torch.int32))
    assert not bank.keys().requires_grad and bank.keys().dtype == torch.float64
    assert torch.equal(bank.entries(1), (keys[[0, 2]] * 2).detach().double())


def test_enqueue_validates_arguments():
    bank = ClassMemoryBank(2, 3, 4)
    with pytest.raises(ValueError, match="keys"):
        bank.enqueue(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        bank.enqueue(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="valid"):
        bank.enqueue(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="labels"):
        bank.enqueue(torch.randn(2, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="capacity"):
        ClassMemoryBank(3, 3, [4, 4])
    with pytest.raises(ValueError, match="capacity"):
        ClassMemoryBank(2, 3, [4, 0])


def test_u2pl_and_ctt_shapes():
    u2pl = ClassMemoryBank(21, 2, [50000] + [30000] * 20, device="meta")
    assert u2pl.keys().shape == (21, 50000, 2) and u2pl.capacities[1] == 30000
    ctt = ClassMemoryBank(21, 256, 256, device="meta")
    assert ctt.keys().shape == (21, 256, 256)


# ----------------------------------------------------------------------------------------------
# CTT admission
# ----------------------------------------------------------------------------------------------

def _brute_topk(scores, labels, candidate, k):
    keep = [False] * len(scores)
    rank = [-1] * len(scores)
    for c in set(labels):
        if c < 0:
            continue
        members = [i for i in range(len(scores)) if labels[i] == c and candidate[i]]

        def key(i):
            nan = scores[i] != scores[i]
            return (float("inf") if nan else -scores[i], i)

        for r, i in enumerate(sorted(members, key=key)):
            rank[i] = r
            keep[i] = r < k
    return keep, rank


@pytest.mark.parametrize("k", [0, 1, 3, 50])
def test_topk_admission_matches_brute_force(k):
    rng = random.Random(k)
    for trial in range(8):
        n = rng.choice([0, 1, 7, 40])
        # Integer-valued scores force many ties; a NaN must rank last.
        scores = [float(rng.randint(0, 5)) for _ in range(n)]
        if n > 3:
            scores[2] = float("nan")
        labels = [rng.choice([0, 1, 2, 3, -1, 255]) for _ in range(n)]
        candidate = [rng.random() < 0.7 for _ in range(n)]
        keep, rank = topk_admission(torch.tensor(scores), torch.tensor(labels, dtype=torch.int64),
                                    torch.tensor(candidate, dtype=torch.bool), k, return_rank=True)
        want_keep, want_rank = _brute_topk(scores, labels, candidate, k)
        assert keep.tolist() == want_keep
        assert rank.tolist() == want_rank


def test_ctt_admission_k():
    assert ctt_admission_k(212, 10) == 10  # VOC 1/50: int(2.41) = 2 < batch 10
    assert ctt_admission_k(372, 2) == 2  # Cityscapes 1/8
    assert ctt_admission_k(10, 4) == 51  # int(51.2) exceeds the batch
    assert ctt_admission_k(64, 4, q=128) == 4  # 2 * 128 / 64 = 4 does not exceed the batch
    for n_l in range(1, 600):  # the official float expression, literally
        for batch in (1, 2, 10):
            official = int((256 / n_l) * 2)
            want = official if official > batch else batch  # noqa: FURB136 (the spec's words)
            assert ctt_admission_k(n_l, batch) == want
    with pytest.raises(ValueError, match="num_labeled"):
        ctt_admission_k(0, 2)


# ----------------------------------------------------------------------------------------------
# Prototypes
# ----------------------------------------------------------------------------------------------

def test_prototype_sums_match_loops_and_ignore_poisoned_rows():
    n, d, C = 50, 5, 4
    feats = torch.randn(n, d, dtype=torch.float64)
    labels = torch.randint(-1, C + 1, (n,))
    labels[:3] = 255
    valid = torch.rand(n) < 0.7
    feats[~valid] = float("nan")
    sums, counts = prototype_sums(feats, labels, C, valid)
    for c in range(C):
        rows = [i for i in range(n) if labels[i] == c and valid[i]]
        assert counts[c] == len(rows)
        want = feats[rows].sum(0) if rows else torch.zeros(d, dtype=torch.float64)
        torch.testing.assert_close(sums[c], want)
    means, present = prototypes(feats, labels, C, valid)
    assert torch.isfinite(means).all()
    assert present.tolist() == (counts > 0).tolist()
    torch.testing.assert_close(means[present], (sums / counts.unsqueeze(1))[present])


def test_prototypes_absent_class_is_zero_and_bf16_accumulates_in_fp32():
    feats = torch.randn(6, 3).to(torch.bfloat16)
    labels = torch.tensor([0, 0, 2, 2, 2, 0])
    means, present = prototypes(feats, labels, 3)
    assert means.dtype == torch.float32
    assert present.tolist() == [True, False, True]
    assert torch.equal(means[1], torch.zeros(3))
    torch.testing.assert_close(means[2], feats[2:5].float().mean(0))


def test_prototype_sums_are_differentiable():
    feats = torch.randn(5, 2, requires_grad=True)
    sums, _ = prototype_sums(feats, torch.tensor([1, 0, 1, -1, 1]), 2)
    sums.sum().backward()
    assert feats.grad[:, 0].tolist() == [1, 1, 1, 0, 1]


# ----------------------------------------------------------------------------------------------
# Negative sampling
# ----------------------------------------------------------------------------------------------

def test_sample_negatives_ranges_empty_queues_and_determinism():
    bank = ClassMemoryBank(4, 2, [5, 3, 8, 2])
    bank.enqueue(torch.randn(12, 2), torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2]))
    ids = torch.tensor([0, 1, 2, 3, -1, 2])
    g = torch.Generator().manual_seed(7)
    idx, active = bank.sample_negatives(ids, (64, 50), g)
    assert idx.shape == (6, 64, 50) and idx.dtype == torch.int64
    assert active.tolist() == [True, False, True, False, False, True]
    fills = [3, 0, 8, 0, 0, 8]
    for row, f in enumerate(fills):
        vals = set(idx[row].unique().tolist())
        assert vals == (set(range(f)) if f else {0}), row  # every slot drawn, none outside
    again, _ = bank.sample_negatives(ids, (64, 50), torch.Generator().manual_seed(7))
    assert torch.equal(idx, again)
    other, _ = bank.sample_negatives(ids, (64, 50), g)
    assert not torch.equal(idx, other)
    rows = bank.keys().view(-1, 2)[bank.flat_index(ids, idx)]
    torch.testing.assert_close(rows[0, 3, 4], bank.keys()[0, idx[0, 3, 4]])


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------

def test_sample_masked_picks_the_rth_true_position():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 37, generator=g) < 0.3
    mask[3] = False  # an empty row
    mask[4] = True
    u = torch.rand(5, 200, generator=g, dtype=torch.float64)
    idx, counts = sample_masked(mask, u)
    assert counts.tolist() == mask.sum(1).tolist()
    for row in range(5):
        positions = mask[row].nonzero().flatten()
        if positions.numel() == 0:
            assert (idx[row] == 0).all()
            continue
        rank = (u[row] * positions.numel()).floor().long()
        assert torch.equal(idx[row], positions[rank])
    # uniform over the True positions: 40000 draws over 37 positions, each within 5 sigma
    u = torch.rand(1, 40000, generator=g, dtype=torch.float64)
    idx, _ = sample_masked(torch.ones(1, 37, dtype=torch.bool), u)
    freq = torch.bincount(idx[0], minlength=37).double()
    expected = 40000 / 37
    assert ((freq - expected).abs() < 5 * expected**0.5).all()
    assert uniform_indices(torch.tensor([[0.999999999]], dtype=torch.float64), torch.tensor([3])).item() == 2
    assert uniform_indices(torch.tensor([[0.5]]), torch.tensor([0])).item() == 0
    with pytest.raises(ValueError, match="mask"):
        sample_masked(torch.ones(3, 4), u)


def test_state_dict_round_trip_and_resume():
    caps = [4, 2, 3]
    a = ClassMemoryBank(3, 3, caps)
    a.enqueue(torch.randn(10, 3), torch.randint(0, 3, (10,)))
    b = ClassMemoryBank(3, 3, caps)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"bank", "capacity", "ptr", "fill"}
    keys, labels = torch.randn(7, 3), torch.randint(0, 3, (7,))
    a.enqueue(keys, labels)
    b.enqueue(keys, labels)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    with pytest.raises(RuntimeError, match="capacit"):
        ClassMemoryBank(3, 3, [4, 3, 2]).load_state_dict(a.state_dict())


def test_module_to_moves_buffers_and_casts_only_the_keys():
    bank = ClassMemoryBank(2, 3, 4).to("cpu").double()
    assert bank.keys().dtype == torch.float64
    assert bank.ptr.dtype == bank.fill.dtype == bank.capacity.dtype == torch.int64
    bank.enqueue(torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 1, 1]))
    assert bank.fill.tolist() == [1, 2]


# ----------------------------------------------------------------------------------------------
# No host syncs
# ----------------------------------------------------------------------------------------------

class _NoHostSync(TorchFunctionMode):
    """CPU stand-in for cuda sync-debug mode: fail on every call that would sync on a device."""

    banned = frozenset({
        "item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "masked_select", "unique",
        "bincount", "repeat_interleave", "__bool__", "__int__", "__float__", "__index__",
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.banned:
            raise AssertionError(f"host sync in the hot path: {name}")
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                raise AssertionError("boolean-mask indexing in the hot path")
        return func(*args, **(kwargs or {}))


def _hot_path(device, n=40):
    bank = ClassMemoryBank(3, 4, [6, 3, 4], device=device)
    keys = torch.randn(n, 4, device=device)
    labels = torch.randint(-1, 4, (n,), device=device)
    valid = torch.rand(n, device=device) < 0.8
    scores = torch.randn(n, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    return bank, keys, labels, valid, scores, g


def _run_hot_path(bank, keys, labels, valid, scores, g):
    keep, rank = topk_admission(scores, labels, valid, 3, return_rank=True)
    bank.enqueue(keys, labels, keep, order=rank)
    bank.enqueue(keys, labels, valid)
    bank.enqueue(keys, labels, torch.zeros_like(valid))
    means, present = prototypes(keys, labels, 3, valid)
    idx, active = bank.sample_negatives(torch.arange(3, device=keys.device), (8, 5), g)
    mask = torch.stack([valid, labels == 1, torch.zeros_like(valid)])
    picked, counts = sample_masked(mask, torch.rand(3, 7, generator=g, device=keys.device))
    return bank.is_full(), bank.valid_mask(), means, present, idx, active, picked, counts


def test_hot_path_makes_no_host_sync_calls():
    args = _hot_path("cpu")
    with _NoHostSync():
        _run_hot_path(*args)


@pytest.mark.gpu
def test_hot_path_on_cuda_without_syncs():
    args = _hot_path("cuda")
    bank = args[0]
    ref = ClassMemoryBank(3, 4, [6, 3, 4])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _run_hot_path(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # Same calls on the CPU give the same bank (RNG streams differ, so skip the samples).
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args[1:5]]
    _run_hot_path(ref, *cpu_args, torch.Generator().manual_seed(0))
    for k, v in bank.state_dict().items():
        torch.testing.assert_close(v.cpu(), ref.state_dict()[k], rtol=0, atol=0)
    idx, active = out[4], out[5]
    assert bool(((idx >= 0) & (idx < bank.fill.view(3, 1, 1).clamp_min(1))).all())
    assert torch.equal(active, bank.fill > 0)
    # Large inputs take other sort and scan kernels on the device; they must not sync either.
    big = _hot_path("cuda", n=300_000)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run_hot_path(*big)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert big[0].fill.tolist() == [6, 3, 4]


@pytest.mark.parametrize("caps", [[5, 4, 6], [2, 1, 3]])
def test_enqueue_rows_equals_enqueue_of_the_gathered_keys(caps):
    # 27 lanes over 9 keys: the rows path writes in chunks of 9 lanes; small capacities make
    # classes overflow, so lanes of one slot (overwritten in the same call) span chunks
    g = torch.Generator().manual_seed(3)
    a = ClassMemoryBank(3, 4, caps)
    b = ClassMemoryBank(3, 4, caps)
    for _ in range(3):
        keys = torch.randn(9, 4, generator=g)
        rows = torch.arange(9).repeat(3)  # every key offered to three queues
        labels = torch.arange(3).repeat_interleave(9)
        valid = torch.rand(27, generator=g) < 0.6
        a.enqueue(keys, labels, valid, rows=rows)
        b.enqueue(keys[rows], labels, valid)
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
