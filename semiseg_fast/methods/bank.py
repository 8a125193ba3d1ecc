"""Per-class FIFO memory banks on the device (spec/methods.md 1, 2 and 5a).

U2PL keeps one negative queue per class (50000 keys for class 0, 30000 for the others) and CTT one
bank of 256 unit features per class. The official code keeps U2PL's queues as Python lists of CPU
tensors and updates them class by class, with ``.item()`` syncs, boolean gathers and per-class
collectives. Here every queue is a ring buffer inside one padded tensor ``bank`` [C, max_cap, D]
with device-side write pointers, so one enqueue of any number of keys of any classes is a handful
of kernels with no host round trip, and the whole state lives in ``state_dict``.

Ring layout. Class c owns slots ``bank[c, :cap[c]]``; ``ptr[c]`` is the next slot to write and
``fill[c]`` the number of valid entries (saturating at ``cap[c]``). Writing starts at slot 0, so
the valid entries are always the leading ``fill[c]`` slots (what ``valid_mask`` and the dense CTT
losses' ``fill`` argument assume); once a class is full its oldest entry sits at ``ptr[c]``.
Slots past ``cap[c]`` are padding and stay zero, as do never-written slots, so a kernel that
masks by ``fill`` reads only finite numbers.

Hot-path rule (DESIGN.md): nothing here calls ``.item()``, ``.cpu()``, ``.tolist()``,
``nonzero`` or boolean-mask indexing on device tensors, and no Python loop runs over classes.
Host-side helpers that do sync are marked as such (``entries``).

Multi-GPU: gather keys, labels and masks from every rank (fixed-size ``all_gather``) and enqueue
the concatenation in rank order on every rank; the banks then stay identical without pickling.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ClassMemoryBank",
    "ctt_admission_k",
    "sample_masked",
    "uniform_indices",
    "prototype_sums",
    "prototypes",
    "topk_admission",
]

_INT64_MAX = torch.iinfo(torch.int64).max


def _check_vector(name: str, t: Tensor | None, n: int, device: torch.device,
                  kind: str) -> None:
    if t is None:
        return
    if kind == "bool":
        ok_dtype = t.dtype == torch.bool
    elif kind == "int":
        ok_dtype = not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    else:
        ok_dtype = t.is_floating_point()
    if t.dim() != 1 or t.shape[0] != n or not ok_dtype:
        raise ValueError(f"{name}: expected {kind} [{n}], got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        # A silent .to() would be a host round trip (or a hidden H2D copy) in the hot path.
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def _segment_rank(group_sorted: Tensor) -> Tensor:
    """Position of each element within its run of equal values in a sorted 1-D tensor."""
    n = group_sorted.shape[0]
    pos = torch.arange(n, device=group_sorted.device)
    is_start = torch.ones_like(group_sorted, dtype=torch.bool)
    is_start[1:] = group_sorted[1:] != group_sorted[:-1]
    # cummax carries the index of the latest run start forward: a scan, so no label range needed.
    run_start = torch.cummax(torch.where(is_start, pos, 0), dim=0).values
    return pos - run_start


# ----------------------------------------------------------------------------------------------
# CTT admission rule
# ----------------------------------------------------------------------------------------------

def ctt_admission_k(num_labeled: int, batch_size: int, q: int = 256) -> int:
    """CTT's per-class, per-step admission count k (spec 2, official ``add_to_memory_bank``).

    ``num_labeled`` is N_l, the number of labeled **images** of the split (the official
    ``labeled_samples``: 212 for VOC 1/50, 372 for Cityscapes 1/8), not a pixel count;
    ``q`` is the per-class bank size (``every_memory_count`` = 256). The official
    ``int((q / N_l) * 2)`` equals the integer ``2 q // N_l`` used here (a float error could
    only reach the next integer for N_l beyond 10^15). k = that value when it exceeds
    ``batch_size``, else ``batch_size``: VOC-212 with batch 10 -> 10, City-372 with batch 2 -> 2.
    """
    for name, v in (("num_labeled", num_labeled), ("batch_size", batch_size), ("q", q)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return max((2 * q) // num_labeled, batch_size)


def topk_admission(scores: Tensor, labels: Tensor, candidate: Tensor, k: int, *,
                   return_rank: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per class keep at most the ``k`` highest-scoring candidates; a bool [N] ``valid`` mask.

    CTT (spec 2): ``scores`` = max raw logit, ``candidate`` = GT==c AND argmax==GT AND
    max logit >= 0.95, class = ``labels``. Ties go to the lower index; NaN scores rank last.
    Any label value forms its own group (no class range needed); labels < 0 are never admitted.

    With ``return_rank`` also returns the rank of each candidate within its class in descending
    score order (0 = best; -1 for non-candidates). The official code writes an admitted class
    best-first when it had at least k candidates and in pixel order otherwise; passing
    ``order=torch.where(n_candidates_c >= k, rank, index)`` to ``enqueue`` reproduces that
    order, which only matters for which entries of a partly evicted batch survive.
    """
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores: expected floating [N], got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    n = scores.shape[0]
    _check_vector("labels", labels, n, scores.device, "int")
    _check_vector("candidate", candidate, n, scores.device, "bool")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k: expected an int, got {k!r}")
    eligible = candidate & (labels >= 0)
    if n == 0:
        none = torch.zeros_like(candidate)
        return (none, torch.zeros_like(labels, dtype=torch.int64)) if return_rank else none
    with torch.no_grad():
        s = torch.nan_to_num(scores.detach(), nan=float("-inf"))
        # Two stable sorts give the lexicographic order (class, -score, index) without packing
        # a float into an integer key.
        by_score = torch.sort(s, descending=True, stable=True).indices
        group = torch.where(eligible, labels.long(), _INT64_MAX)
        by_class = torch.sort(group.index_select(0, by_score), stable=True).indices
        perm = by_score.index_select(0, by_class)
        group_sorted = group.index_select(0, perm)
        rank_sorted = _segment_rank(group_sorted)
        keep_sorted = (group_sorted != _INT64_MAX) & (rank_sorted < k)
        keep = torch.empty_like(candidate).scatter_(0, perm, keep_sorted)
        if not return_rank:
            return keep
        rank_sorted = torch.where(group_sorted != _INT64_MAX, rank_sorted, -1)
        rank = torch.empty_like(rank_sorted).scatter_(0, perm, rank_sorted)
        return keep, rank


# ----------------------------------------------------------------------------------------------
# Sync-free uniform sampling (U2PL anchors and negatives)
# ----------------------------------------------------------------------------------------------

def uniform_indices(u: Tensor, counts: Tensor) -> Tensor:
    """floor(u * n) per row: uniform draws in [0, n) from uniforms ``u`` [K, ...] in [0, 1)
    and counts ``counts`` [K]; rows with n = 0 get 0. Pass float64 ``u`` for large n."""
    n = counts.view((counts.shape[0],) + (1,) * (u.dim() - 1)).to(u.dtype)
    idx = (u * n).floor().long()
    # u < 1 already gives idx < n; the clamp guards the last ulp of the multiply.
    return torch.minimum(idx, (n.long() - 1).clamp_min(0))


def sample_masked(mask: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform draws with replacement from the True positions of each row of ``mask`` [K, N].

    ``u`` [K, M] uniforms in [0, 1) pick the r-th True position, r = floor(u * count), through a
    row-wise prefix sum and ``searchsorted`` (no ``nonzero``, no host sync). Returns
    ``indices`` int64 [K, M] in [0, N) (0 for an empty row) and ``counts`` int64 [K].
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected bool [K, N], got {mask.dtype} {tuple(mask.shape)}")
    if u.dim() != 2 or u.shape[0] != mask.shape[0] or not u.is_floating_point():
        raise ValueError(f"u: expected floating [K={mask.shape[0]}, M], got {u.dtype} {tuple(u.shape)}")
    cum = torch.cumsum(mask, dim=1)
    counts = cum[:, -1] if mask.shape[1] else torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    rank = uniform_indices(u, counts)
    # the r-th True position (0-based) is the first one whose inclusive prefix count exceeds r
    idx = torch.searchsorted(cum, rank, right=True)
    return torch.where(counts.unsqueeze(1) > 0, idx, 0), counts


# ----------------------------------------------------------------------------------------------
# Segmented per-class reductions (prototypes)
# ----------------------------------------------------------------------------------------------

def prototype_sums(feats: Tensor, labels: Tensor, num_classes: int,
                   valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-class sums [C, D] and counts [C] int64 of ``feats`` [N, D] in one ``index_add_``.

    Rows with ``valid`` False or a label outside [0, C) (e.g. 255) are routed to a dump row that
    is sliced off, so NaN or inf in ignored rows cannot leak into the sums. Sums accumulate in
    at least float32 (bf16/fp16 features are widened). Differentiable w.r.t. ``feats``; U2PL's
    prototypes come from the teacher, so its callers pass detached features.
    """
    if feats.dim() != 2 or not feats.is_floating_point():
        raise ValueError(f"feats: expected floating [N, D], got {feats.dtype} "
                         f"{tuple(feats.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    n, d = feats.shape
    _check_vector("labels", labels, n, feats.device, "int")
    _check_vector("valid", valid, n, feats.device, "bool")
    ok = (labels >= 0) & (labels < num_classes)
    if valid is not None:
        ok = ok & valid
    seg = torch.where(ok, labels.long(), num_classes)
    acc = torch.promote_types(feats.dtype, torch.float32)
    sums = feats.new_zeros(num_classes + 1, d, dtype=acc).index_add(0, seg, feats.to(acc))
    counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=feats.device)
    counts.index_add_(0, seg, torch.ones_like(seg))
    return sums[:num_classes], counts[:num_classes]


def prototypes(feats: Tensor, labels: Tensor, num_classes: int,
               valid: Tensor | None = None, reduce=None) -> tuple[Tensor, Tensor]:
    """Per-class means [C, D] and a bool ``present`` [C]; absent classes get a zero vector.

    The official U2PL leaves absent prototypes NaN (quirk Q4, unused there); zero plus the
    ``present`` flag keeps every downstream kernel NaN-free without a host-side branch.
    ``reduce`` (e.g. ``DistEnv.all_reduce_sum``) sums the per-class sums and counts over the
    ranks first, so the means are those of the global batch.
    """
    sums, counts = prototype_sums(feats, labels, num_classes, valid)
    if reduce is not None:
        both = reduce(torch.cat((sums, counts.unsqueeze(1).to(sums.dtype)), dim=1))
        sums, counts = both[:, :-1], both[:, -1]
    present = counts > 0
    return sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype), present


# ----------------------------------------------------------------------------------------------
# The bank
# ----------------------------------------------------------------------------------------------

class ClassMemoryBank(nn.Module):
    """C per-class FIFO queues of D-dim keys, one ring buffer per class in a padded tensor.

    ``capacity`` is one int for every class or a sequence of C ints (U2PL: ``[50000] +
    [30000] * 20``; CTT: 256). Buffers (all in ``state_dict``): ``bank`` [C, max_cap, D],
    ``capacity`` [C], ``ptr`` [C] and ``fill`` [C], int64. Loading a state with different
    capacities fails instead of silently reinterpreting the rings.
    """

    bank: Tensor
    capacity: Tensor
    ptr: Tensor
    fill: Tensor

    def __init__(self, num_classes: int, dim: int, capacity: int | Sequence[int],
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if isinstance(capacity, int) and not isinstance(capacity, bool):
            caps = [capacity] * num_classes
        else:
            caps = list(capacity)
        if len(caps) != num_classes or any(
                isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in caps):
            raise ValueError(f"capacity: expected a positive int or {num_classes} positive ints, "
                             f"got {capacity!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
        self.num_classes = num_classes
        self.dim = dim
        self.capacities = tuple(caps)
        self.max_capacity = max(caps)
        self.register_buffer(
            "bank", torch.zeros(num_classes, self.max_capacity, dim, dtype=dtype, device=device))
        self.register_buffer("capacity", torch.tensor(caps, dtype=torch.int64, device=device))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.int64, device=device))
        self.register_buffer("fill", torch.zeros(num_classes, dtype=torch.int64, device=device))

    def extra_repr(self) -> str:
        caps = self.capacities
        cap = caps[0] if len(set(caps)) == 1 else list(caps)
        return (f"num_classes={self.num_classes}, dim={self.dim}, capacity={cap}, "
                f"dtype={self.bank.dtype}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "capacity"
        if key in state_dict:
            saved = state_dict[key]
            # Checkpoint load is off the hot path, so comparing on the host is fine here.
            if saved.shape != self.capacity.shape or not torch.equal(
                    saved.detach().cpu(), self.capacity.detach().cpu()):
                error_msgs.append(
                    f"{key}: the checkpoint's per-class capacities {saved.tolist()} differ from "
                    f"this bank's {list(self.capacities)}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- views -----------------------------------------------------------------------------------

    def keys(self) -> Tensor:
        """The storage [C, max_cap, D]; slot j of class c is valid iff j < fill[c]."""
        return self.bank

    def valid_mask(self) -> Tensor:
        """Bool [C, max_cap] of valid slots (the leading ``fill[c]`` of each row)."""
        slots = torch.arange(self.max_capacity, device=self.fill.device)
        return slots.unsqueeze(0) < self.fill.unsqueeze(1)

    def full(self) -> Tensor:
        """Bool [C]: which queues are full."""
        return self.fill >= self.capacity

    def fill_fraction(self) -> Tensor:
        """float32 []: the queues' mean fill fraction over the classes (a device value, no sync)."""
        return (self.fill.float() / self.capacity.float()).mean()

    def is_full(self) -> Tensor:
        """0-d device bool: every queue full (CTT's switch for its contrastive terms)."""
        return self.full().all()

    def entries(self, c: int) -> Tensor:
        """Valid keys of class ``c`` oldest first [fill[c], D]. Syncs: for tests and debugging."""
        if not 0 <= c < self.num_classes:
            raise IndexError(f"class {c} out of range [0, {self.num_classes})")
        fill, ptr, cap = int(self.fill[c]), int(self.ptr[c]), self.capacities[c]
        row = self.bank[c]
        if fill < cap:
            return row[:fill]
        return torch.cat([row[ptr:cap], row[:ptr]])

    def flat_index(self, class_ids: Tensor, indices: Tensor) -> Tensor:
        """int64 [K, ...]: rows of ``keys().view(-1, D)`` holding slots ``indices`` int64 [K, ...] of
        ``class_ids`` int [K]."""
        shape = (class_ids.shape[0],) + (1,) * (indices.dim() - 1)
        return class_ids.clamp(0, self.num_classes - 1).view(shape) * self.max_capacity + indices

    # -- updates ---------------------------------------------------------------------------------

    @torch.no_grad()
    def reset(self) -> None:
        self.bank.zero_()
        self.ptr.zero_()
        self.fill.zero_()

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor, valid: Tensor | None = None,
                order: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
        """Append ``keys`` [N, D] to the queues of ``labels`` [N]; returns the counts [C] offered.

        Keys of one class enter in input order (or ascending ``order`` [N], ties by input index).
        A class offered more keys than its capacity keeps only its last ``cap`` keys, exactly as
        if they had been pushed one by one into a ``deque(maxlen=cap)``. Keys with ``valid``
        False or a label outside [0, C) (U2PL/CTT ignore label 255) are skipped. Keys are
        detached and cast to the bank dtype.

        ``rows`` (int64 [L]) offers ``keys[rows]`` instead of ``keys``, with ``labels``, ``valid``
        and ``order`` of length L: a key can go to several queues (U2PL's negatives) without the
        caller materialising the repeated keys.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim or not keys.is_floating_point():
            raise ValueError(f"keys: expected floating [N, {self.dim}], got {keys.dtype} "
                             f"{tuple(keys.shape)}")
        device = self.bank.device
        if keys.device != device:
            raise ValueError(f"keys: expected a tensor on {device}, got {keys.device}")
        n = keys.shape[0]
        if rows is not None:
            _check_vector("rows", rows, rows.shape[0] if rows.dim() == 1 else -1, device, "int")
            n = rows.shape[0]
        _check_vector("labels", labels, n, device, "int")
        _check_vector("valid", valid, n, device, "bool")
        _check_vector("order", order, n, device, "int")
        C, Q = self.num_classes, self.max_capacity
        if n == 0:
            return torch.zeros(C, dtype=torch.int64, device=device)

        ok = (labels >= 0) & (labels < C)
        if valid is not None:
            ok = ok & valid
        # Skipped keys form a sentinel class C that sorts after every real one.
        cls = torch.where(ok, labels.long(), C)
        if order is None:
            perm = torch.sort(cls, stable=True).indices
        else:
            by_order = torch.sort(order.long(), stable=True).indices
            perm = by_order.index_select(
                0, torch.sort(cls.index_select(0, by_order), stable=True).indices)
        cls_sorted = cls.index_select(0, perm)

        counts = torch.zeros(C + 1, dtype=torch.int64, device=device)
        counts.index_add_(0, cls, torch.ones_like(cls))
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n, device=device) - start.index_select(0, cls_sorted)

        c = cls_sorted.clamp_max(C - 1)
        cap = self.capacity.index_select(0, c)
        n_c = counts.index_select(0, c)
        # Keys of rank < n_c - cap are overwritten later in this very call. Rather than drop
        # their write lanes (a data-dependent shape), each one writes the value of the survivor
        # that owns the same slot (same rank mod cap), so duplicate indices carry identical rows
        # and the scatter is deterministic whatever order the device applies it in.
        first_kept = (n_c - cap).clamp_min(0)
        kept_rank = first_kept + torch.remainder(rank - first_kept, cap)
        slot = torch.remainder(self.ptr.index_select(0, c) + rank, cap)
        dest = c * Q + slot
        # Skipped lanes repeat lane 0 (sorted first: a real key whenever any key is valid).
        # Their computed positions refer to class C-1's segment: in range, but meaningless, so
        # pin them to 0 rather than lean on that arithmetic staying in range.
        skipped = cls_sorted == C
        src_pos = torch.where(skipped, 0, start.index_select(0, c) + kept_rank)
        src = perm.index_select(0, src_pos)
        dest = torch.where(skipped, dest[0], dest)
        src = torch.where(skipped, src[0], src)

        flat = self.bank.view(C * Q, self.dim)
        any_valid = counts[C] < n
        # When nothing is valid lane 0 writes a junk key into some slot; save that one row and
        # put it back below, which costs O(D) instead of an [N, D] select on every call.
        saved = flat.index_select(0, dest[:1])
        if rows is not None:
            src = rows.long().index_select(0, src)
        # Gathered and written keys.shape[0] lanes at a time: U2PL offers every key to every
        # queue (C N lanes), and one gather would hold C N D values (2.8 GB at VOC sizes) where a
        # chunk holds N D. Lanes of one slot carry identical rows, so chunk order is immaterial.
        step = keys.shape[0]
        for lo in range(0, n, step):
            values = keys.detach().index_select(0, src[lo : lo + step]).to(self.bank.dtype)
            flat.index_copy_(0, dest[lo : lo + step], values)
        restored = torch.where(any_valid, flat.index_select(0, dest[:1]), saved)
        flat.index_copy_(0, dest[:1], restored)

        offered = counts[:C]
        self.ptr.copy_(torch.remainder(self.ptr + offered, self.capacity))
        self.fill.copy_(torch.minimum(self.fill + offered, self.capacity))
        return offered

    # -- sampling --------------------------------------------------------------------------------

    def sample_negatives(self, class_ids: Tensor, shape: int | Sequence[int],
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Uniform slot indices with replacement from each listed class's valid entries.

        Returns ``indices`` int64 [K, *shape] with row k in [0, fill[class_ids[k]]) and
        ``active`` bool [K]. A class with an empty queue (or an id outside [0, C)) gets index 0
        and ``active`` False (U2PL: such a class adds 0 to the loss). U2PL draws 256 x 50 per
        processed class. Drawn on the bank's device from ``generator`` (which must live there;
        None = that device's default generator) in float64, so the floor(u * fill) bins are
        uniform to ~1e-11 even for 50000-entry queues.
        """
        device = self.bank.device
        if class_ids.dim() != 1 or class_ids.is_floating_point() or class_ids.dtype == torch.bool:
            raise ValueError(f"class_ids: expected integer [K], got {class_ids.dtype} "
                             f"{tuple(class_ids.shape)}")
        if class_ids.device != device:
            raise ValueError(f"class_ids: expected a tensor on {device}, got {class_ids.device}")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        k = class_ids.shape[0]
        u = torch.rand((k, *shape), generator=generator, device=device, dtype=torch.float64)
        return self.negatives_from_uniforms(class_ids, u)

    def negatives_from_uniforms(self, class_ids: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``sample_negatives`` from uniforms ``u`` float64 [K, ...] drawn by the caller (e.g. in an eager
        region, so the indexing itself can run inside a captured graph), for classes ``class_ids``
        int [K]: (slots int64 [K, ...], bool [K]: the class's queue holds something)."""
        in_range = (class_ids >= 0) & (class_ids < self.num_classes)
        cid = class_ids.long().clamp(0, self.num_classes - 1)
        fill = torch.where(in_range, self.fill.index_select(0, cid), 0)
        return uniform_indices(u, fill), fill > 0
