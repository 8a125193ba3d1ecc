"""Reference contrastive losses (U2PL sampled, CTT HC/LC) against loops and the official code."""
import math

import pytest
import torch

from semiseg_fast.reference import (
    class_bank_contrast_hc,
    class_bank_contrast_lc,
    sampled_contrast,
    sampled_contrast_grad,
)


def _cos(u, v):
    dot = math.fsum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(math.fsum(a * a for a in u)) * math.sqrt(math.fsum(b * b for b in v)))


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# U2PL sampled contrast
# ---------------------------------------------------------------------------------------------

def brute_sampled(anchors, protos, bank, anchor_idx, neg_idx, tau, num_valid, active=None):
    A, P, Bk = anchors.tolist(), protos.tolist(), bank.tolist()
    total = 0.0
    for k in range(anchor_idx.shape[0]):
        if active is not None and not active[k]:
            continue
        per_anchor = []
        for m in range(anchor_idx.shape[1]):
            a = A[int(anchor_idx[k, m])]
            keys = [P[k]] + [Bk[int(j)] for j in neg_idx[k, m]]
            logits = [_cos(a, key) / tau for key in keys]
            top = max(logits)
            lse = top + math.log(math.fsum(math.exp(v - top) for v in logits))
            per_anchor.append(lse - logits[0])
        total += math.fsum(per_anchor) / len(per_anchor)
    return total / num_valid


def _sampled_case(N=13, D=6, K=3, M=5, Q=7, Nneg=4):
    anchors = torch.randn(N, D, dtype=torch.float64)
    protos = torch.randn(K, D, dtype=torch.float64)
    bank = torch.randn(K * Q, D, dtype=torch.float64)  # K queues of Q rows, flattened
    anchor_idx = torch.randint(0, N, (K, M))
    anchor_idx[0, :3] = 4  # duplicated anchor within a class
    anchor_idx[K - 1, 1] = 4  # and across classes
    neg_idx = torch.randint(0, Q, (K, M, Nneg)) + Q * torch.arange(K).view(K, 1, 1)
    neg_idx[1, 2, :] = Q  # one negative drawn repeatedly
    return anchors, protos, bank, anchor_idx, neg_idx


def test_sampled_forward_matches_loops():
    anchors, protos, bank, aidx, nidx = _sampled_case()
    got = sampled_contrast(anchors, protos, bank, aidx, nidx, 0.5, num_valid=5)
    want = brute_sampled(anchors, protos, bank, aidx, nidx, 0.5, 5)
    assert got.item() == pytest.approx(want, rel=1e-12)
    got = sampled_contrast(anchors, protos, bank, aidx, nidx, temperature=0.2)
    assert got.item() == pytest.approx(brute_sampled(anchors, protos, bank, aidx, nidx, 0.2, 3),
                                       rel=1e-12)
    active = torch.tensor([True, False, True])
    got = sampled_contrast(anchors, protos, bank, aidx, nidx, num_valid=torch.tensor(4.0),
                           active=active)
    want = brute_sampled(anchors, protos, bank, aidx, nidx, 0.5, 4, active.tolist())
    assert got.item() == pytest.approx(want, rel=1e-12)
    none = sampled_contrast(anchors, protos, bank, aidx, nidx, num_valid=2,
                            active=torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0


def test_sampled_gradient_only_to_anchors_and_matches_closed_form():
    anchors, protos, bank, aidx, nidx = _sampled_case()
    anchors.requires_grad_(True)
    protos.requires_grad_(True)
    bank.requires_grad_(True)
    active = torch.tensor([True, True, False])
    loss = sampled_contrast(anchors, protos, bank, aidx, nidx, 0.5, num_valid=4, active=active)
    go = torch.tensor(1.7, dtype=torch.float64)
    loss.backward(go)
    assert protos.grad is None and bank.grad is None
    closed = sampled_contrast_grad(anchors, protos, bank, aidx, nidx, 0.5, num_valid=4,
                                   active=active, grad_output=go)
    torch.testing.assert_close(anchors.grad, closed, rtol=1e-12, atol=1e-15)
    unsampled = torch.ones(anchors.shape[0], dtype=torch.bool)
    unsampled[aidx[:2].reshape(-1)] = False
    assert torch.all(anchors.grad[unsampled] == 0)
    assert torch.all(anchors.grad[4].abs() > 0)


def test_sampled_duplicates_accumulate_gradcheck():
    anchors, protos, bank, aidx, nidx = _sampled_case(N=5, D=4, K=2, M=4, Q=5, Nneg=3)
    aidx[:] = torch.tensor([[1, 1, 1, 3], [1, 0, 3, 3]])
    anchors.requires_grad_(True)

    def f(a):
        return sampled_contrast(a, protos, bank, aidx, nidx, 0.5, num_valid=3)

    assert torch.autograd.gradcheck(f, (anchors,))
    # Pixel 1 is sampled four times: its gradient is the sum of the four per-sample gradients.
    (g,) = torch.autograd.grad(f(anchors), anchors)
    per_sample = torch.zeros(4, dtype=torch.float64)
    for k, m in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        keys = torch.cat([protos[k : k + 1], bank[nidx[k, m]]])
        a = anchors[1].detach().requires_grad_(True)
        logits = torch.cosine_similarity(a[None], keys, dim=1) / 0.5
        single = (torch.logsumexp(logits, 0) - logits[0]) / (4 * 3)
        per_sample += torch.autograd.grad(single, a)[0]
    torch.testing.assert_close(g[1], per_sample, rtol=1e-12, atol=1e-15)


def test_sampled_validation():
    anchors, protos, bank, aidx, nidx = _sampled_case()
    with pytest.raises(ValueError, match="anchor_idx"):
        sampled_contrast(anchors, protos, bank, aidx + 100, nidx)
    with pytest.raises(ValueError, match="neg_idx"):
        sampled_contrast(anchors, protos, bank, aidx, nidx + 100)
    with pytest.raises(ValueError, match="num_valid"):
        sampled_contrast(anchors, protos, bank, aidx, nidx, num_valid=0)
    with pytest.raises(ValueError, match="keys_pos"):
        sampled_contrast(anchors, protos[:2], bank, aidx, nidx)


# ---------------------------------------------------------------------------------------------
# CTT HC / LC
# ---------------------------------------------------------------------------------------------

def brute_hc(z, labels, bank, t, fill, eps=1e-12):
    """Loops over classes, anchors and positives with Python floats."""
    C = bank.shape[0]
    Z, G = z.tolist(), bank.tolist()
    per_class = []
    for c in range(C):
        anchors = [Z[i] for i in range(len(Z)) if int(labels[i]) == c]
        if not anchors or fill[c] == 0:
            continue
        terms = []
        for a in anchors:
            neg = math.fsum(math.exp(_cos(a, G[o][j]) / t)
                            for o in range(C) if o != c for j in range(fill[o]))
            for j in range(fill[c]):
                e = math.exp(_cos(a, G[c][j]) / t)
                terms.append(-math.log(e / (e + neg + eps) + eps))
        per_class.append(math.fsum(terms) / len(terms))
    return math.fsum(per_class) / len(per_class) if per_class else 0.0


def brute_lc(z, labels, positive, bank, t, fill, eps=1e-12):
    C = bank.shape[0]
    Z, Pz, G = z.tolist(), positive.tolist(), bank.tolist()
    per_class = []
    for c in range(C):
        idx = [i for i in range(len(Z)) if int(labels[i]) == c]
        if not idx:
            continue
        terms = []
        for i in idx:
            neg = math.fsum(math.exp(_cos(Z[i], G[o][j]) / t)
                            for o in range(C) if o != c for j in range(fill[o]))
            e = math.exp(_cos(Z[i], Pz[i]) / t)
            terms.append(-math.log(e / (e + neg + eps) + eps))
        per_class.append(math.fsum(terms) / len(terms))
    return math.fsum(per_class) / len(per_class) if per_class else 0.0


def official_contr_self_loss(memory_bank, pred_rep, labels, mask, num_classes, temp=0.1):
    """The released ``contr_self_loss`` restated: NCHW features, masks, full banks."""
    num_feat = pred_rep.shape[1]
    pred_rep = pred_rep.permute(0, 2, 3, 1)
    loss, class_count, size, eps = 0.0, 0, memory_bank.size(1), 1e-12
    for i in range(num_classes):
        negative_feat = memory_bank[[j for j in range(num_classes) if j != i]].view(-1, num_feat)
        all_feats = torch.cat([memory_bank[i], negative_feat])
        which = mask & (labels == i)
        if which.sum() == 0:
            continue
        class_count += 1
        rep = pred_rep[which]
        logits = (rep @ all_feats.T) / (torch.norm(rep, dim=1).unsqueeze(0).T
                                        @ torch.norm(all_feats, dim=1).unsqueeze(0))
        logits = torch.exp(logits / temp)
        down = torch.sum(logits[:, size:], dim=1).unsqueeze(1)
        posi = logits[:, :size]
        loss = loss + (-torch.log(posi / (posi + down + eps) + eps)).sum() / (size * len(rep))
    return loss / class_count


def official_contr_net_loss(memory_bank, rep_l, rep_r, labels, mask, num_classes, temp=0.5):
    """The released ``contr_net_loss`` restated (directional mask folded into ``mask``)."""
    num_feat = rep_l.shape[1]
    rep_l, rep_r = rep_l.permute(0, 2, 3, 1), rep_r.permute(0, 2, 3, 1)
    loss, class_count, eps = 0.0, 0, 1e-12
    for i in range(num_classes):
        negative_feat = memory_bank[[j for j in range(num_classes) if j != i]].view(-1, num_feat)
        which = mask & (labels == i)
        if which.sum() == 0:
            continue
        class_count += 1
        a, b = rep_l[which], rep_r[which]
        logits = (a @ negative_feat.T) / (torch.norm(a, dim=1).unsqueeze(0).T
                                          @ torch.norm(negative_feat, dim=1).unsqueeze(0))
        down = torch.sum(torch.exp(logits / temp), dim=1)
        posi = torch.exp(torch.sum(a * b, dim=1) / (torch.norm(a, dim=1) * torch.norm(b, dim=1))
                         / temp)
        loss = loss + (-torch.log(posi / (posi + down + eps) + eps)).sum() / len(a)
    return loss / class_count


def _dense_case(N=11, C=4, Q=3, D=5, dtype=torch.float64):
    z = _unit(torch.randn(N, D, dtype=dtype))
    labels = torch.randint(0, C, (N,))
    bank = _unit(torch.randn(C, Q, D, dtype=dtype))
    return z, labels, bank


def test_hc_matches_loops_and_official_code():
    z, labels, bank = _dense_case()
    labels[:4] = torch.tensor([0, 1, 2, 3])  # every class present
    got = class_bank_contrast_hc(z, labels, bank)
    assert got.item() == pytest.approx(brute_hc(z, labels, bank, 0.1, [3] * 4), rel=1e-12)
    # The official loop on an NCHW map (N = 1 x 11 x 1) with a selection mask.
    rep = z.T.reshape(1, 5, 11, 1)
    lab = labels.reshape(1, 11, 1)
    mask = torch.ones(1, 11, 1, dtype=torch.bool)
    want = official_contr_self_loss(bank, rep, lab, mask, 4)
    assert got.item() == pytest.approx(want.item(), rel=1e-13)
    got32 = class_bank_contrast_hc(z.float(), labels, bank.float())
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-5)


def test_hc_degenerate_cases():
    z, labels, bank = _dense_case(N=9, C=4, Q=4)
    labels[:] = torch.tensor([0, 0, 2, 2, 2, 1, 1, -1, 0])  # class 3 absent, one non-anchor
    fill = torch.tensor([4, 2, 0, 3])  # partial banks; class 2 has anchors but no positives
    bank[1, 2:] = 0.0  # unfilled rows are never read (0 / 0 would be NaN)
    bank[2] = 0.0
    got = class_bank_contrast_hc(z, labels, bank, temperature=0.2, fill=fill)
    want = brute_hc(z, labels, bank, 0.2, fill.tolist())
    assert got.item() == pytest.approx(want, rel=1e-12)
    # All anchors in one class.
    one = torch.full((9,), 3)
    got = class_bank_contrast_hc(z, one, bank, fill=fill)
    assert got.item() == pytest.approx(brute_hc(z, one, bank, 0.1, fill.tolist()), rel=1e-12)
    # No anchors (all marked), or anchors only in empty-positive classes: 0 and a zero gradient.
    for lab in (torch.full((9,), -1), torch.full((9,), 2)):
        zz = z.clone().requires_grad_(True)
        loss = class_bank_contrast_hc(zz, lab, bank, fill=fill)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.all(zz.grad == 0)
    # Empty anchor tensor.
    zz = z[:0].clone().requires_grad_(True)
    assert class_bank_contrast_hc(zz, labels[:0], bank).item() == 0.0


def test_hc_gradcheck_and_bank_gets_no_gradient():
    z, labels, bank = _dense_case(N=6, C=3, Q=2, D=4)
    labels[:3] = torch.tensor([0, 1, 2])
    fill = torch.tensor([2, 1, 2])
    z.requires_grad_(True)
    bank.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: class_bank_contrast_hc(x, labels, bank, 0.1, fill=fill), (z,))
    class_bank_contrast_hc(z, labels, bank, fill=fill).backward()
    assert bank.grad is None


def test_lc_matches_loops_and_official_code():
    z, labels, bank = _dense_case(N=12, C=4, Q=6)
    positive = _unit(z + 0.3 * torch.randn_like(z))
    labels[0] = 3
    got = class_bank_contrast_lc(z, labels, positive, bank)
    assert got.item() == pytest.approx(brute_lc(z, labels, positive, bank, 0.5, [6] * 4),
                                       rel=1e-12)
    rep_l, rep_r = z.T.reshape(1, 5, 3, 4), positive.T.reshape(1, 5, 3, 4)
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    want = official_contr_net_loss(bank, rep_l, rep_r, labels.reshape(1, 3, 4), mask, 4)
    assert got.item() == pytest.approx(want.item(), rel=1e-13)


def test_lc_degenerate_cases_and_gradients():
    z, labels, bank = _dense_case(N=7, C=3, Q=4, D=4)
    positive = _unit(torch.randn_like(z))
    labels[:] = torch.tensor([1, 1, 1, -1, 1, 1, -1])  # all anchors in one class, two skipped
    fill = torch.tensor([1, 4, 0])  # class 2 bank empty, class 0 partial
    bank[0, 1:] = 0.0
    bank[2] = 0.0
    got = class_bank_contrast_lc(z, labels, positive, bank, fill=fill)
    assert got.item() == pytest.approx(brute_lc(z, labels, positive, bank, 0.5, fill.tolist()),
                                       rel=1e-12)
    # No negatives at all: NEG = 0.
    empty = torch.tensor([0, 4, 0])
    got = class_bank_contrast_lc(z, labels, positive, bank, fill=empty)
    assert got.item() == pytest.approx(brute_lc(z, labels, positive, bank, 0.5, [0, 4, 0]),
                                       rel=1e-12)
    assert class_bank_contrast_lc(z, torch.full((7,), -1), positive, bank).item() == 0.0

    z.requires_grad_(True)
    positive.requires_grad_(True)
    labels[:] = torch.tensor([0, 2, 1, -1, 1, 0, 2])
    assert torch.autograd.gradcheck(
        lambda a, b: class_bank_contrast_lc(a, labels, b, bank, 0.5, fill=fill,
                                            detach_positive=False), (z, positive))
    class_bank_contrast_lc(z, labels, positive, bank, fill=fill).backward()
    assert positive.grad is None and z.grad is not None
    assert torch.all(z.grad[3] == 0) and torch.all(z.grad[0] != 0)


def test_dense_validation():
    z, labels, bank = _dense_case()
    with pytest.raises(ValueError, match="labels"):
        class_bank_contrast_hc(z, labels + 10, bank)
    with pytest.raises(ValueError, match="fill"):
        class_bank_contrast_hc(z, labels, bank, fill=torch.tensor([1, 2, 3, 9]))
    with pytest.raises(ValueError, match="positive"):
        class_bank_contrast_lc(z, labels, z[:3], bank)
    with pytest.raises(ValueError, match="bank"):
        class_bank_contrast_hc(z, labels, bank[..., :2])
