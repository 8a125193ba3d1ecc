"""U2PL's pixel selection for the contrastive loss (spec/methods.md section 1, steps 4 and 5):
which 1/4-grid pixels are anchors and negatives of each class, in which order the queues receive
the negatives, and how anchors and negatives are drawn. All no-grad tensor work, no host syncs;
the official-bug switches Q1 and Q2 are the ``official`` arguments (see ``u2pl.py``).
"""
from __future__ import annotations

import torch

from .bank import ClassMemoryBank, prototypes, sample_masked
from .common import IGNORE

DELTA_P = 0.3  # anchor: teacher probability of its class above this
NEG_PROB = 1.0  # negative: teacher probability of the class below this (inactive, U2PL #109)
NUM_ANCHORS, NUM_NEGATIVES = 256, 50


def negative_mask(labels: torch.Tensor, is_labeled: torch.Tensor, rank_l: torch.Tensor, rank_u: torch.Tensor,
                  num_classes: int, official: bool) -> torch.Tensor:
    """bool [N, C]: pixel p is a negative candidate of class c by label and rank (before the
    entropy test). ``labels`` int64 [N] (255 ignored), ``is_labeled`` bool [N, 1], ``rank_l`` /
    ``rank_u`` bool [N, C] = rank of c below r_l / in [r_l, r_h). Intent: label != c; ``official`` (Q2): label == c, which with the
    labeled rule's GT != c leaves no labeled negative at all."""
    onehot = labels.unsqueeze(1) == torch.arange(num_classes, device=labels.device)
    if official:
        return onehot & torch.where(is_labeled, rank_l & ~onehot, rank_u)
    return ~onehot & (labels != IGNORE).unsqueeze(1) & torch.where(is_labeled, rank_l, rank_u)


def processed_rows(present: torch.Tensor, official: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Which queue each of the C loss rows draws negatives from (int64 [C]), and which rows may count
    (bool [C]), from ``present`` bool [C].

    Row c always takes the anchors and prototype of class c. Intent: the queue of class c, rows of
    classes in V (present = has low-entropy pixels). ``official`` (Q1): row i < |V| takes the
    queue of V[i], the i-th present class - right only when V = {0, ..., |V| - 1}."""
    classes = torch.arange(present.shape[0], device=present.device)
    if official:
        v_sorted = torch.sort((~present).to(torch.uint8), stable=True).indices
        return v_sorted, classes < present.sum()
    return classes, present


def contrast_targets(rep_t: torch.Tensor, labels: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                     prob: torch.Tensor, rank_u: torch.Tensor, rank_l: torch.Tensor, num_labeled_rows: int,
                     official_q2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one step's 1/4-grid rows give the contrast (spec section 1): rows [N] in raster order,
    labeled images first (the first ``num_labeled_rows``); ``rep_t`` float32 [N, D] teacher
    representation, ``labels`` int64 [N] (255 ignored), ``low`` / ``high`` bool [N] entropy masks,
    ``prob`` float32 [N, C], ``rank_u`` / ``rank_l`` bool [N, C].

    Returns (candidates bool [N, C]: anchors of class c, prototypes float32 [C, D] of the
    low-entropy pixels, present bool [C]: classes with low-entropy pixels, negative bool [N, C]:
    keys to enqueue for class c)."""
    num_classes = prob.shape[1]
    onehot = labels.unsqueeze(1) == torch.arange(num_classes, device=labels.device)  # ignored: no class
    is_labeled = (torch.arange(labels.numel(), device=labels.device) < num_labeled_rows).unsqueeze(1)
    low_valid = onehot & low.unsqueeze(1)
    candidates = low_valid & (prob > DELTA_P)
    proto, _ = prototypes(rep_t, labels, num_classes, valid=low)
    negative = negative_mask(labels, is_labeled, rank_l, rank_u, num_classes, official_q2)
    negative = negative & high.unsqueeze(1) & (prob < NEG_PROB)
    return candidates, proto, low_valid.any(0), negative


def enqueue_negatives(bank: ClassMemoryBank, keys: torch.Tensor, negative: torch.Tensor) -> None:
    """Enqueue ``keys`` float [N, D] where ``negative`` bool [N, C] says, class by class, pixels in
    raster order: the official enqueue order. The bank writes the C N
    (class, pixel) lanes N at a time, so no C N x D copy of the keys exists."""
    n, num_classes = negative.shape
    rows = torch.arange(n, device=keys.device).repeat(num_classes)
    classes = torch.arange(num_classes, device=keys.device).repeat_interleave(n)
    bank.enqueue(keys, classes, negative.T.reshape(-1), rows=rows)


def draw_uniforms(generator: torch.Generator, num_classes: int, device: torch.device, anchors: int = NUM_ANCHORS,
                  negatives: int = NUM_NEGATIVES) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's sampling draws, anchors then negatives (the official order): float64 [C, anchors]
    and [C, anchors, negatives] on the device."""
    u_anchor = torch.rand((num_classes, anchors), generator=generator, device=device, dtype=torch.float64)
    u_neg = torch.rand((num_classes, anchors, negatives), generator=generator, device=device, dtype=torch.float64)
    return u_anchor, u_neg


def sample_contrast(bank: ClassMemoryBank, candidates: torch.Tensor, present: torch.Tensor, u_anchor: torch.Tensor,
                    u_neg: torch.Tensor, official_q1: bool) -> dict[str, torch.Tensor]:
    """Anchor and negative indices of the C loss rows from the draws, and which rows count:
    the index inputs of ``ops.sampled_contrast``: ``anchor_idx`` int64 [C, A], ``neg_idx`` int64
    [C, A, M], ``active`` bool [C], ``num_valid`` float32 []. ``candidates`` bool [N, C], ``present``
    bool [C], ``u_anchor`` float64 [C, A], ``u_neg`` float64 [C, A, M]."""
    neg_class, row_ok = processed_rows(present, official_q1)
    anchor_idx, n_candidates = sample_masked(candidates.T.contiguous(), u_anchor)
    slots, has_negatives = bank.negatives_from_uniforms(neg_class, u_neg)
    num_valid = present.sum()
    return {"anchor_idx": anchor_idx, "neg_idx": bank.flat_index(neg_class, slots),
            "active": row_ok & (n_candidates > 0) & has_negatives & (num_valid > 1),
            "num_valid": num_valid.clamp(min=1).float()}
