"""Pixel-to-memory-bank contrastive losses as custom ops (spec/methods.md 5a).

``sampled_contrast`` (U2PL): op ``semiseg::sampled_contrast`` returns the un-normalised sum
sum_k active_k loss_k; the Python entry divides by ``num_valid`` outside the op, so |V| may be a
device tensor (no host read) and autograd carries the division. The backward op
``semiseg::sampled_contrast_backward`` is the reference's closed form
:func:`semiseg_fast.reference.sampled_contrast_grad`. Empty cases: no row (K = 0) or no sampled
anchor (M = 0) gives 0 and a zero gradient.

``class_bank_contrast`` (CTT HC/LC): op ``semiseg::class_bank_contrast``. The reference has
no gradient function, and recomputing it inside the backward op would need autograd there (a
custom op's implementation runs with autograd dispatch excluded; ``torch.func.vjp`` works but
leaks functorch wrappers to any outer dispatch mode, which ``opcheck``'s schema check trips
over). So ``semiseg::class_bank_contrast_backward`` is a closed form derived here, exact with
the reference's eps terms and its norm-product cosine, and tested against autograd through the
reference. With x = e^{s+/t}, NEG = sum_j e^{s_j/t}, D = x + NEG + eps, r = x / D and
l = -log(r + eps), per anchor and positive:

    w = 1 / ((r + eps) D^2),   dl/ds+ = -w (NEG + eps) x / t,   dl/ds_j = w x e^{s_j/t} / t,

and the cosine s = a.k / (|a| |k|) passes on ds (k / (|a| |k|) - s a / |a|^2) to the anchor
(and, for an LC positive that is not detached, symmetrically to it). Gradients reach ``z`` and
that positive; banks never get one.

Index ranges (``anchor_idx`` < N, ``neg_idx`` < Q, ``labels`` < C, ``fill`` <= Q) need the
data, so the Python entries do not check them: the reference raises ValueError naming the
argument; the fused kernels (no host sync) will not check them.

Precision. References: float32/float64 compute in their own dtype, bf16/fp16 in float32 (CTT's
reference keeps the official exp without max-subtraction). Kernels: the sampled loss gathers and
reduces in float32; the class-bank loss feeds bf16/fp16 unit rows to the tensor cores as given
and float32 ones at IEEE or TF32 precision (``precision``), accumulates in float32 and
max-subtracts every exp, so no temperature overflows it. The loss and gradients come back in the
input dtype.

Kernel launcher signatures (``LAUNCHERS`` of kernels/contrast.py):
``sampled_contrast(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active) -> sum``,
``sampled_contrast_backward(grad, anchors, keys_pos, bank, anchor_idx, neg_idx, temperature,
active) -> d_anchors``, ``class_bank_contrast(z, labels, bank, positive, fill, mode,
temperature, eps, precision) -> loss``, ``class_bank_contrast_backward(grad, z, labels, bank,
positive, fill, mode, temperature, eps, precision, positive_grad) -> [dz] or [dz, d_positive]``
(``precision`` "ieee" or "tf32": the ops resolve "auto" from PyTorch's float32 matmul switch
before the launch; the references ignore it).
"""
from collections.abc import Sequence

import torch
from torch import Tensor

from ..reference import contrast as ref
from . import _dispatch as d

try:
    from ..kernels import contrast as _kernels
except ImportError as exc:  # no Triton on this platform: the references serve every call
    _kernels = exc
_PATH = d.HotPath("contrast", _kernels)
_MODES = ("hc", "lc")
_DEFAULT_TEMPERATURE = {"hc": 0.1, "lc": 0.5}
_PRECISIONS = ("auto", "ieee", "tf32")


# ------------------------------------------------------------------------------------------------
# U2PL sampled contrast
# ------------------------------------------------------------------------------------------------

def _reference_sampled(anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor,
                       neg_idx: Tensor, temperature: float, active: Tensor | None) -> Tensor:
    if anchor_idx.shape[1] == 0:  # the reference's mean over no anchor would be NaN
        return anchors.new_zeros(())
    dt = d.compute_dtype(anchors.dtype)
    loss = ref.sampled_contrast(anchors.to(dt), keys_pos.to(dt), bank.to(dt), anchor_idx,
                                neg_idx, temperature, num_valid=1, active=active)
    return loss.to(anchors.dtype)


def _reference_sampled_backward(grad: Tensor, anchors: Tensor, keys_pos: Tensor, bank: Tensor,
                                anchor_idx: Tensor, neg_idx: Tensor, temperature: float,
                                active: Tensor | None) -> Tensor:
    if anchor_idx.shape[1] == 0:
        return torch.zeros_like(anchors)
    dt = d.compute_dtype(anchors.dtype)
    grad_anchors = ref.sampled_contrast_grad(
        anchors.to(dt), keys_pos.to(dt), bank.to(dt), anchor_idx, neg_idx, temperature,
        num_valid=1, active=active, grad_output=grad.to(dt))
    return grad_anchors.to(anchors.dtype)


@torch.library.custom_op("semiseg::sampled_contrast", mutates_args=())
def _sampled_op(anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor,
                neg_idx: Tensor, temperature: float, active: Tensor | None,
                impl: str) -> Tensor:
    return _PATH.launch("sampled_contrast", impl, anchors.device, _reference_sampled,
                        anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active)


@_sampled_op.register_fake
def _(anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, impl):
    return anchors.new_empty(())


@torch.library.custom_op("semiseg::sampled_contrast_backward", mutates_args=())
def _sampled_backward_op(grad: Tensor, anchors: Tensor, keys_pos: Tensor, bank: Tensor,
                         anchor_idx: Tensor, neg_idx: Tensor, temperature: float,
                         active: Tensor | None, impl: str) -> Tensor:
    return _PATH.launch("sampled_contrast_backward", impl, anchors.device,
                        _reference_sampled_backward, grad, anchors, keys_pos, bank,
                        anchor_idx, neg_idx, temperature, active)


@_sampled_backward_op.register_fake
def _(grad, anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, impl):
    return anchors.new_empty(anchors.shape)


def _sampled_setup(ctx, inputs, output):
    anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, impl = inputs
    ctx.save_for_backward(anchors, keys_pos, bank, anchor_idx, neg_idx, active)
    ctx.config = (temperature, impl)


def _sampled_backward(ctx, grad):
    anchors, keys_pos, bank, anchor_idx, neg_idx, active = ctx.saved_tensors
    temperature, impl = ctx.config
    grad_anchors = None
    if ctx.needs_input_grad[0]:
        grad_anchors = torch.ops.semiseg.sampled_contrast_backward(
            grad, anchors, keys_pos, bank, anchor_idx, neg_idx, temperature, active, impl)
    return grad_anchors, None, None, None, None, None, None, None


_sampled_op.register_autograd(_sampled_backward, setup_context=_sampled_setup)


def sampled_contrast(anchors: Tensor, keys_pos: Tensor, bank: Tensor, anchor_idx: Tensor,
                     neg_idx: Tensor, temperature: float = 0.5, *,
                     num_valid: float | Tensor | None = None,
                     active: Tensor | None = None, impl: str | None = None) -> Tensor:
    """U2PL contrastive loss on explicitly sampled anchors and negatives (spec 5a).

    ``anchors`` float [N, D] (the only input with a gradient), ``keys_pos`` float [K, D]
    prototypes, ``bank`` float [R, D] negative key rows (a ``ClassMemoryBank``'s queues flattened:
    ``keys().view(-1, D)`` with ``flat_index``, a view, never a per-class copy), all three of one
    dtype; ``anchor_idx`` int64 [K, M] rows of ``anchors`` (duplicates add their gradients),
    ``neg_idx`` int64 [K, M, Nneg] rows of ``bank``, ``active`` bool [K] (default all).
    Returns a 0-d tensor of anchors' dtype,
    sum_k active_k mean_m CE(cos(a_m, [proto, negs]) / temperature, 0) / num_valid;
    ``num_valid`` defaults to max(K, 1) and may be a 0-d device tensor (not checked for > 0,
    which would need a host read).
    """
    d.check_float("anchors", anchors, "[N, D]", 2)
    dim = anchors.shape[1]
    d.check_like("anchor_idx", anchor_idx, "anchors", anchors, dtype=False)
    d.check_dtype("anchor_idx", anchor_idx, (torch.int64,))
    if anchor_idx.dim() != 2:
        raise ValueError(f"anchor_idx: expected [K, M], got shape {tuple(anchor_idx.shape)}")
    k, m = anchor_idx.shape
    d.check_like("keys_pos", keys_pos, "anchors", anchors)
    d.check_shape("keys_pos", keys_pos, (k, dim), "[K, D]")
    d.check_like("bank", bank, "anchors", anchors)
    if bank.dim() != 2 or bank.shape[1] != dim:
        raise ValueError(f"bank: expected key rows [R, D] with D={dim}, got {tuple(bank.shape)}")
    d.check_like("neg_idx", neg_idx, "anchors", anchors, dtype=False)
    d.check_dtype("neg_idx", neg_idx, (torch.int64,))
    if neg_idx.dim() != 3 or tuple(neg_idx.shape[:2]) != (k, m):
        raise ValueError(f"neg_idx: expected [K, M, Nneg] with K={k}, M={m}, "
                         f"got {tuple(neg_idx.shape)}")
    if neg_idx.numel() > 0 and bank.shape[0] == 0:
        raise ValueError("bank: expected R >= 1 rows to draw the negatives of neg_idx from")
    if dim < 1:
        raise ValueError(f"anchors: expected D >= 1 feature columns, got {tuple(anchors.shape)}")
    d.check_range("anchor_idx", anchor_idx, 0, anchors.shape[0], f"indices in [0, N = {anchors.shape[0]})")
    d.check_range("neg_idx", neg_idx, 0, bank.shape[0], f"row indices in [0, R = {bank.shape[0]})")
    temperature = d.check_positive("temperature", temperature)
    if active is not None:
        d.check_like("active", active, "anchors", anchors, dtype=False)
        d.check_dtype("active", active, (torch.bool,))
        d.check_shape("active", active, (k,), "[K]")
    if num_valid is None:
        divisor: float | Tensor = float(max(k, 1))
    elif isinstance(num_valid, Tensor):
        d.check_like("num_valid", num_valid, "anchors", anchors, dtype=False)
        if num_valid.dim() != 0 or num_valid.dtype == torch.bool or num_valid.is_complex():
            raise ValueError(f"num_valid: expected a real 0-d tensor, got {num_valid.dtype} "
                             f"{tuple(num_valid.shape)}")
        divisor = num_valid.detach().to(anchors.dtype)
    else:
        divisor = d.check_positive("num_valid", num_valid)
    mode = _PATH.resolve(impl, "sampled_contrast", "sampled_contrast_backward")
    total = torch.ops.semiseg.sampled_contrast(anchors, keys_pos.detach(), bank.detach(),
                                               anchor_idx, neg_idx, temperature, active, mode)
    return total / divisor


# ------------------------------------------------------------------------------------------------
# CTT class-bank contrast (HC / LC)
# ------------------------------------------------------------------------------------------------

def _bank_loss(z: Tensor, labels: Tensor, bank: Tensor, positive: Tensor | None,
               fill: Tensor | None, mode: str, temperature: float, eps: float) -> Tensor:
    if mode == "hc":
        return ref.class_bank_contrast_hc(z, labels, bank, temperature, eps, fill)
    return ref.class_bank_contrast_lc(z, labels, positive, bank, temperature, eps,
                                      detach_positive=False, fill=fill)


def _reference_bank(z: Tensor, labels: Tensor, bank: Tensor, positive: Tensor | None,
                    fill: Tensor | None, mode: str, temperature: float,
                    eps: float, precision: str) -> Tensor:
    dt = d.compute_dtype(z.dtype)
    positive = None if positive is None else positive.to(dt)
    loss = _bank_loss(z.to(dt), labels, bank.to(dt), positive, fill, mode, temperature, eps)
    return loss.to(z.dtype)


def _fill_counts(bank: Tensor, fill: Tensor | None) -> list[int]:
    return [bank.shape[1]] * bank.shape[0] if fill is None else fill.tolist()


def _cos_backward(a: Tensor, a_norm: Tensor, keys: Tensor, k_norm: Tensor, cos: Tensor,
                  g: Tensor) -> Tensor:
    """d/da of sum_pn g_pn cos_pn, cos_pn = a_p . k_n / (|a_p| |k_n|): [P, D]."""
    along = (g / k_norm[None, :]) @ keys / a_norm[:, None]
    radial = (g * cos).sum(dim=1, keepdim=True) * a / a_norm[:, None] ** 2
    return along - radial


def _ce_weight(x: Tensor, neg: Tensor, eps: float) -> Tensor:
    """w = 1 / ((r + eps) D^2) of l = -log(r + eps), r = x / D, D = x + neg + eps."""
    ratio, denom = ref.official_ratio(x, neg, eps)
    return 1.0 / ((ratio + eps) * denom**2)


def _hc_backward(grad: Tensor, z: Tensor, labels: Tensor, bank: Tensor, fill: list[int],
                 t: float, eps: float) -> Tensor:
    classes = [c for c in range(bank.shape[0]) if fill[c] > 0 and bool((labels == c).any())]
    dz = torch.zeros_like(z)
    for c in classes:
        n_pos, chosen = fill[c], labels == c
        z_c = z[chosen]
        keys = torch.cat([bank[c, :n_pos], ref.other_classes(bank, fill, c)])
        z_norm, k_norm = z_c.norm(dim=1), keys.norm(dim=1)
        cos = (z_c @ keys.T) / (z_norm[:, None] * k_norm[None, :])
        e = torch.exp(cos / t)
        pos, neg = e[:, :n_pos], e[:, n_pos:].sum(dim=1, keepdim=True)
        w = _ce_weight(pos, neg, eps) * (grad / (n_pos * z_c.shape[0] * len(classes)))
        g = torch.cat([-w * (neg + eps) * pos / t,
                       (w * pos).sum(dim=1, keepdim=True) * e[:, n_pos:] / t], dim=1)
        dz[chosen] += _cos_backward(z_c, z_norm, keys, k_norm, cos, g)
    return dz


def _lc_backward(grad: Tensor, z: Tensor, labels: Tensor, bank: Tensor, positive: Tensor,
                 fill: list[int], t: float, eps: float) -> tuple[Tensor, Tensor]:
    classes = [c for c in range(bank.shape[0]) if bool((labels == c).any())]
    dz, dp = torch.zeros_like(z), torch.zeros_like(positive)
    for c in classes:
        chosen = labels == c
        z_c, p_c = z[chosen], positive[chosen]
        keys = ref.other_classes(bank, fill, c)
        z_norm, k_norm, p_norm = z_c.norm(dim=1), keys.norm(dim=1), p_c.norm(dim=1)
        cos = (z_c @ keys.T) / (z_norm[:, None] * k_norm[None, :])
        e = torch.exp(cos / t)
        neg = e.sum(dim=1)
        s_pos = ref.row_cosine(z_c, p_c)
        x = torch.exp(s_pos / t)
        w = _ce_weight(x, neg, eps) * (grad / (z_c.shape[0] * len(classes)))
        g_pos = (-w * (neg + eps) * x / t)[:, None]
        g_neg = (w * x)[:, None] * e / t
        both = (z_norm * p_norm)[:, None]
        dz[chosen] += (_cos_backward(z_c, z_norm, keys, k_norm, cos, g_neg)
                       + g_pos * (p_c / both - s_pos[:, None] * z_c / z_norm[:, None] ** 2))
        dp[chosen] += g_pos * (z_c / both - s_pos[:, None] * p_c / p_norm[:, None] ** 2)
    return dz, dp


def _reference_bank_backward(grad: Tensor, z: Tensor, labels: Tensor, bank: Tensor,
                             positive: Tensor | None, fill: Tensor | None, mode: str,
                             temperature: float, eps: float, precision: str,
                             positive_grad: bool) -> list[Tensor]:
    dt = d.compute_dtype(z.dtype)
    z_c, bank_c, grad_c = z.to(dt), bank.to(dt), grad.to(dt)
    counts = _fill_counts(bank, fill)
    if mode == "hc":
        grads = [_hc_backward(grad_c, z_c, labels, bank_c, counts, temperature, eps)]
    else:
        dz, dp = _lc_backward(grad_c, z_c, labels, bank_c, positive.to(dt), counts,
                              temperature, eps)
        grads = [dz, dp] if positive_grad else [dz]
    return [g.to(z.dtype) for g in grads]


def _dot_precision(precision: str) -> str:
    """"ieee" or "tf32" for the ``precision`` argument: "auto" is PyTorch's float32 matmul
    switch now (``torch.set_float32_matmul_precision`` or ``fp32_precision``)."""
    return d.fp32_matmul_precision() if precision == "auto" else precision


@torch.library.custom_op("semiseg::class_bank_contrast", mutates_args=())
def _bank_op(z: Tensor, labels: Tensor, bank: Tensor, positive: Tensor | None,
             fill: Tensor | None, mode: str, temperature: float, eps: float,
             impl: str, precision: str = "auto") -> Tensor:
    return _PATH.launch("class_bank_contrast", impl, z.device, _reference_bank,
                        z, labels, bank, positive, fill, mode, temperature, eps,
                        _dot_precision(precision))


@_bank_op.register_fake
def _(z, labels, bank, positive, fill, mode, temperature, eps, impl, precision="auto"):
    return z.new_empty(())


@torch.library.custom_op("semiseg::class_bank_contrast_backward", mutates_args=())
def _bank_backward_op(grad: Tensor, z: Tensor, labels: Tensor, bank: Tensor,
                      positive: Tensor | None, fill: Tensor | None, mode: str,
                      temperature: float, eps: float, positive_grad: bool,
                      impl: str, precision: str = "auto") -> list[Tensor]:
    return _PATH.launch("class_bank_contrast_backward", impl, z.device,
                        _reference_bank_backward, grad, z, labels, bank, positive, fill, mode,
                        temperature, eps, _dot_precision(precision), positive_grad)


@_bank_backward_op.register_fake
def _(grad, z, labels, bank, positive, fill, mode, temperature, eps, positive_grad, impl,
      precision="auto"):
    grads = [z.new_empty(z.shape)]
    if positive_grad:
        grads.append(positive.new_empty(positive.shape))
    return grads


def _bank_setup(ctx, inputs, output):
    z, labels, bank, positive, fill, mode, temperature, eps, impl, precision = inputs
    ctx.save_for_backward(z, labels, bank, positive, fill)
    # "auto" read now, as the forward's launch just did: the backward runs at the forward's
    # precision even when the switch changes before backward() (a context around the forward)
    ctx.config = (mode, temperature, eps, _dot_precision(precision), impl)


def _bank_backward(ctx, grad):
    z, labels, bank, positive, fill = ctx.saved_tensors
    mode, temperature, eps, precision, impl = ctx.config
    positive_grad = positive is not None and ctx.needs_input_grad[3]
    grad_z = grad_positive = None
    if ctx.needs_input_grad[0] or positive_grad:
        grads = torch.ops.semiseg.class_bank_contrast_backward(
            grad, z, labels, bank, positive, fill, mode, temperature, eps, positive_grad, impl,
            precision)
        grad_z = grads[0]
        if positive_grad:
            grad_positive = grads[1]
    return grad_z, None, None, grad_positive, None, None, None, None, None, None


_bank_op.register_autograd(_bank_backward, setup_context=_bank_setup)


def class_bank_contrast(z: Tensor, labels: Tensor, bank: Tensor, mode: str = "hc", *,
                        positive: Tensor | None = None,
                        temperature: float | None = None, eps: float = 1e-12,
                        fill: Tensor | Sequence[int] | None = None,
                        detach_positive: bool = True, precision: str | None = None,
                        impl: str | None = None) -> Tensor:
    """CTT loss (a 0-d tensor of z's dtype) of anchors ``z`` float [N, D] against per-class banks
    ``bank`` float [C, Q, D] of z's dtype (spec 5a).

    mode "hc": every positive of the anchor's class bank against the other classes' entries
    (temperature default 0.1). mode "lc": one explicit ``positive`` float [N, D] per anchor (z's
    dtype; the peer network's feature, detached unless ``detach_positive`` is False) against the
    other classes of a [C, 2Q, D] bank (temperature default 0.5). ``labels`` int32 or int64 [N],
    negative = not an anchor; ``fill`` int32 or int64 [C] (or a list) = valid leading entries per
    class (default all). Semantics, eps terms and the empty cases (no counted class gives 0) are
    the reference's.

    ``precision`` (fused kernel only) sets the matmul precision of float32 inputs: "ieee",
    "tf32", or None = "auto", which follows PyTorch's float32 matmul precision at the forward
    (``torch.set_float32_matmul_precision``: "highest", the default, -> IEEE; "high"/"medium"
    -> TF32; or ``torch.backends.cuda.matmul.fp32_precision``), the switch that also decides a
    float32 ``z @ bank.T`` in PyTorch; the backward runs at the forward's precision. bf16/fp16
    always run on the tensor cores as given, with fp32 accumulation; float64 runs the reference.
    """
    mode = d.check_choice("mode", mode, _MODES)
    d.check_float("z", z, "[N, D]", 2)
    n, dim = z.shape
    d.check_like("bank", bank, "z", z)
    if bank.dim() != 3 or bank.shape[2] != dim:
        raise ValueError(f"bank: expected [C, Q, D] with D={dim}, got {tuple(bank.shape)}")
    c = bank.shape[0]
    d.check_like("labels", labels, "z", z, dtype=False)
    d.check_dtype("labels", labels, d.INDEX_DTYPES)
    d.check_shape("labels", labels, (n,), "[N]")
    if mode == "lc":
        if positive is None:
            raise ValueError("positive: mode 'lc' needs the peer features [N, D]")
        d.check_like("positive", positive, "z", z)
        d.check_shape("positive", positive, z.shape, "the shape of z [N, D]")
        if detach_positive:
            positive = positive.detach()
    elif positive is not None:
        raise ValueError("positive: only mode 'lc' takes explicit positives (hc uses the bank)")
    temperature = d.check_positive(
        "temperature", _DEFAULT_TEMPERATURE[mode] if temperature is None else temperature)
    eps = d.check_finite("eps", d.check_real("eps", eps))
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    if dim < 1:
        raise ValueError(f"z: expected D >= 1 feature columns, got {tuple(z.shape)}")
    d.check_range("labels", labels, None, c, f"values < C = {c} (negative values mark non-anchors)")
    if fill is not None:
        if not isinstance(fill, Tensor):
            fill = torch.as_tensor(fill, dtype=torch.int64, device=z.device)
        d.check_like("fill", fill, "z", z, dtype=False)
        d.check_dtype("fill", fill, d.INDEX_DTYPES)
        d.check_shape("fill", fill, (c,), "[C]")
        d.check_range("fill", fill, 0, bank.shape[1] + 1, f"entry counts in [0, Q = {bank.shape[1]}]")
    precision = d.check_choice("precision", "auto" if precision is None else precision,
                               _PRECISIONS)
    impl_mode = _PATH.resolve(impl, "class_bank_contrast", "class_bank_contrast_backward")
    return torch.ops.semiseg.class_bank_contrast(z, labels, bank.detach(), positive, fill, mode,
                                                 temperature, eps, impl_mode, precision)


__all__ = ["class_bank_contrast", "sampled_contrast"]
