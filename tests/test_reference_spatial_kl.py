"""Reference IPixMatch spatial KL against a brute-force loop over images, classes and pixels."""
import math

import pytest
import torch

from semiseg_fast.reference import spatial_kl, spatial_kl_grad


def brute_spatial_kl(p, q, t, tau, ignore=None):
    """Per-image loss with Python floats and the literal KL definition sum pi (log pi - log psi)."""
    B, C, H, W = p.shape
    P, Qv = p.double().tolist(), q.double().tolist()
    out = []
    for b in range(B):
        omega = []
        for i in range(H):
            for j in range(W):
                logits = [P[b][c][i][j] for c in range(C)]
                top = max(logits)
                conf = 1.0 / math.fsum(math.exp(v - top) for v in logits)
                if conf > tau and not (ignore is not None and bool(ignore[b, i, j])):
                    omega.append((i, j))
        n = len(omega)
        if n < 2:
            out.append(0.0)
            continue
        total = 0.0
        for c in range(C):
            ps = [P[b][c][i][j] / t for i, j in omega]
            qs = [Qv[b][c][i][j] / t for i, j in omega]
            mp, mq = max(ps), max(qs)
            zp = math.fsum(math.exp(v - mp) for v in ps)
            zq = math.fsum(math.exp(v - mq) for v in qs)
            kl = 0.0
            for vp, vq in zip(ps, qs):
                log_pi = vp - mp - math.log(zp)
                log_psi = vq - mq - math.log(zq)
                kl += math.exp(log_pi) * (log_pi - log_psi)
            total += kl
        out.append(total / (C * math.log(n)))
    return torch.tensor(out, dtype=torch.float64)


def _logits(B, C, H, W, scale=3.0):
    return torch.randn(B, C, H, W, dtype=torch.float64) * scale


def _with_confident_counts(counts, C=3, H=3, W=5):
    """Teacher logits whose image b has exactly counts[b] pixels above tau = 0.8."""
    B = len(counts)
    p = torch.rand(B, C, H, W, dtype=torch.float64) * 0.2  # near-uniform: conf ~ 1/C
    for b, n in enumerate(counts):
        flat = p[b].reshape(C, -1)
        pix = torch.randperm(H * W)[:n]
        flat[torch.randint(0, C, (n,)), pix] += 8.0  # conf > 0.99
    return p


def test_forward_matches_brute_force_odd_sizes():
    p, q = _logits(3, 5, 7, 9), _logits(3, 5, 7, 9)
    for tau in (0.0, 0.5, 0.8):
        want = brute_spatial_kl(p, q, 4.0, tau)
        got = spatial_kl(p, q, temperature=4.0, tau=tau, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(spatial_kl(p, q, tau=tau), want.mean(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(spatial_kl(p, q, tau=tau, reduction="sum"), want.sum(),
                                   rtol=1e-12, atol=1e-14)
    want = brute_spatial_kl(p, q, 1.5, 0.3)
    torch.testing.assert_close(spatial_kl(p, q, 1.5, 0.3, reduction="none"), want, rtol=1e-12,
                               atol=1e-14)


def test_omega_sizes_zero_one_two_all_and_ignored_image():
    counts = [0, 1, 2, 15, 15]
    p = _with_confident_counts(counts)
    q = _logits(len(counts), 3, 3, 5)
    ignore = torch.zeros(len(counts), 3, 5, dtype=torch.bool)
    ignore[4] = True  # every pixel of the last image excluded
    ignore[3, 0, :2] = True  # two pixels of the full image excluded
    q.requires_grad_(True)
    got = spatial_kl(p, q, ignore=ignore, reduction="none")
    want = brute_spatial_kl(p, q.detach(), 4.0, 0.8, ignore)
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)
    assert got[0].item() == 0.0 and got[1].item() == 0.0 and got[4].item() == 0.0
    assert got[2].item() > 0.0 and got[3].item() > 0.0
    got.sum().backward()
    assert torch.all(q.grad[[0, 1, 4]] == 0)
    # Only pixels of Omega in images with |Omega| >= 2 get a gradient.
    omega = (torch.softmax(p, 1).amax(1) > 0.8) & ~ignore
    omega[[0, 1, 4]] = False
    assert torch.all(q.grad.abs().sum(1)[~omega] == 0)
    assert torch.all(q.grad.abs().sum(1)[omega] > 0)


def test_all_images_degenerate_gives_zero_and_zero_grad():
    p = _with_confident_counts([0, 1])
    q = _logits(2, 3, 3, 5).requires_grad_(True)
    loss = spatial_kl(p, q)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(q.grad == 0)


def test_teacher_gets_no_gradient():
    p = _logits(2, 4, 3, 5).requires_grad_(True)
    q = _logits(2, 4, 3, 5).requires_grad_(True)
    spatial_kl(p, q, tau=0.3).backward()
    assert p.grad is None
    assert q.grad is not None


def test_gradcheck():
    p = _with_confident_counts([2, 8, 0], C=3, H=2, W=4)
    q = _logits(3, 3, 2, 4).requires_grad_(True)
    ignore = torch.zeros(3, 2, 4, dtype=torch.bool)
    ignore[1, 1, 1:3] = True
    assert torch.autograd.gradcheck(lambda x: spatial_kl(p, x, 2.5, 0.8, ignore), (q,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_autograd_equals_closed_form(reduction):
    p = _with_confident_counts([2, 9, 15, 0])
    q = _logits(4, 3, 3, 5).requires_grad_(True)
    ignore = torch.zeros(4, 3, 5, dtype=torch.bool)
    ignore[1, 1, 1:3] = True

    def f(x):
        return spatial_kl(p, x, temperature=2.5, tau=0.8, ignore=ignore, reduction=reduction)

    go = torch.randn(4 if reduction == "none" else (), dtype=torch.float64)
    (dq,) = torch.autograd.grad(f(q), q, go)
    closed = spatial_kl_grad(p, q, 2.5, 0.8, ignore, reduction=reduction, grad_output=go)
    torch.testing.assert_close(dq, closed, rtol=1e-12, atol=1e-15)
    if reduction == "mean":
        (dq1,) = torch.autograd.grad(f(q), q)
        torch.testing.assert_close(dq1, spatial_kl_grad(p, q, 2.5, 0.8, ignore), rtol=1e-12,
                                   atol=1e-15)


def test_float32_stays_float32_and_is_close():
    p, q = _logits(2, 4, 5, 3), _logits(2, 4, 5, 3)
    got = spatial_kl(p.float(), q.float(), tau=0.4, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), spatial_kl(p, q, tau=0.4, reduction="none"),
                               rtol=1e-4, atol=1e-6)


def test_validation_errors_name_the_argument():
    p = _logits(2, 3, 4, 4)
    with pytest.raises(ValueError, match="q"):
        spatial_kl(p, p[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        spatial_kl(p, p, temperature=0.0)
    with pytest.raises(ValueError, match="ignore"):
        spatial_kl(p, p, ignore=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="reduction"):
        spatial_kl(p, p, reduction="max")
    with pytest.raises(ValueError, match="p"):
        spatial_kl(p[0], p[0])
