"""IPixMatch spatial softmax KL as a differentiable custom op (spec/methods.md 5c).

Ops: ``semiseg::spatial_kl`` returns the loss together with the per-row statistics the gradient
needs, LSE [B, 2, C] (teacher and student log-sum-exp over Omega at temperature t, float32) and
the per-image weight 1 / (C ln |Omega|) [B] (float32, 0 when |Omega| < 2);
``semiseg::spatial_kl_backward`` takes them back, so the fused backward reads p and q once and
writes dq once instead of recomputing the statistics (5 instead of 7 tensor-sized transfers over
forward + backward). The teacher logits ``p`` get no gradient. Semantics (Omega, degenerate
images, reductions) are the reference's, see its module docstring.

Both implementations compute the same per-image pieces, and everything around them is done here,
once, with the reference's formulas (semiseg_fast.reference.spatial_kl): the forward kernel or
:func:`~semiseg_fast.reference.spatial_kl.image_statistics` gives LSE, the KL per class and
|Omega|, then ``image_weight`` (in float64, rounded once to float32), ``image_loss`` and
``reduce_images`` make the loss; the backward computes the per-image scale with ``grad_scale`` and
the backward kernel or ``scaled_grad`` applies it to the closed form
dL/dq_kj = s_b (softmax_j(q_k/t) - pi_kj) on Omega. The saved weight is float32, so where the
reference computes in float64 the backward recounts |Omega| for an exact scale.

Precision: float32/float64 compute in their own dtype; bf16/fp16 inputs compute in float32 and
the loss (and the gradient of ``q``) come back in the input dtype.

Kernel launcher signatures (``LAUNCHERS`` of kernels/spatial_kl.py), the same as the reference
bodies here: ``spatial_kl(p, q, temperature, tau, ignore) -> (lse, kl, n)`` and
``spatial_kl_backward(p, q, lse, scale, temperature, tau, ignore) -> dq``.
"""

import torch
from torch import Tensor

from ..reference.spatial_kl import (
    confident_set,
    grad_scale,
    image_loss,
    image_statistics,
    image_weight,
    reduce_images,
    scaled_grad,
)
from . import _dispatch as d

try:
    from ..kernels import spatial_kl as _kernels
except ImportError as exc:  # no Triton on this platform: the references serve every call
    _kernels = exc
_PATH = d.HotPath("spatial_kl", _kernels)
_REDUCTIONS = ("mean", "sum", "none")


def _reference_statistics(p: Tensor, q: Tensor, temperature: float, tau: float,
                          ignore: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward launcher's outputs: LSE float32 [B, 2, C], KL [B, C] in the compute dtype and
    |Omega| int64 [B]."""
    dt = d.compute_dtype(q.dtype)
    lse, kl, n = image_statistics(p.to(dt), q.to(dt), temperature, tau, ignore)
    return lse.float(), kl, n


def _reference_backward(p: Tensor, q: Tensor, lse: Tensor, scale: Tensor, temperature: float,
                        tau: float, ignore: Tensor | None) -> Tensor:
    # recomputes the softmaxes over Omega in the compute dtype: the float32 LSE is not used
    dt = d.compute_dtype(q.dtype)
    dq = scaled_grad(p.to(dt), q.to(dt), temperature, tau, ignore, scale.to(dt))
    return dq.to(q.dtype).contiguous()


@torch.library.custom_op("semiseg::spatial_kl", mutates_args=())
def _spatial_kl_op(p: Tensor, q: Tensor, temperature: float, tau: float,
                   ignore: Tensor | None, reduction: str, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    lse, kl, n = _PATH.launch("spatial_kl", impl, q.device, _reference_statistics,
                              p, q, temperature, tau, ignore)
    weight = image_weight(n, p.shape[1])
    loss = reduce_images(image_loss(kl, weight.to(kl.dtype)), reduction)
    return loss.to(q.dtype), lse, weight.float()


@_spatial_kl_op.register_fake
def _(p, q, temperature, tau, ignore, reduction, impl):
    b, c = p.shape[:2]
    loss = q.new_empty((b,) if reduction == "none" else ())
    return loss, q.new_empty((b, 2, c), dtype=torch.float32), q.new_empty((b,), dtype=torch.float32)


@torch.library.custom_op("semiseg::spatial_kl_backward", mutates_args=())
def _spatial_kl_backward_op(grad: Tensor, p: Tensor, q: Tensor, lse: Tensor, weight: Tensor,
                            temperature: float, tau: float, ignore: Tensor | None,
                            reduction: str, impl: str) -> Tensor:
    scale = grad_scale(weight, temperature, grad.to(weight.dtype), reduction)
    args = (p, q, lse, scale, temperature, tau, ignore)
    if (d.compute_dtype(q.dtype) == torch.float64
            and _PATH.launcher("spatial_kl_backward", impl, q.device, *args) is None):
        # the float64 reference would inherit the float32 rounding of the saved weight: recount
        # Omega for an exact scale (the kernel computes in float32 and keeps the saved one)
        exact = image_weight(confident_set(p, tau, ignore).sum(dim=1), p.shape[1])
        args = (p, q, lse, grad_scale(exact, temperature, grad.double(), reduction), temperature, tau, ignore)
    return _PATH.launch("spatial_kl_backward", impl, q.device, _reference_backward, *args)


@_spatial_kl_backward_op.register_fake
def _(grad, p, q, lse, weight, temperature, tau, ignore, reduction, impl):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    p, q, temperature, tau, ignore, reduction, impl = inputs
    _, lse, weight = output
    ctx.mark_non_differentiable(lse, weight)
    ctx.save_for_backward(p, q, ignore, lse, weight)
    ctx.config = (temperature, tau, reduction, impl)


def _backward(ctx, grad, _grad_lse, _grad_weight):
    p, q, ignore, lse, weight = ctx.saved_tensors
    temperature, tau, reduction, impl = ctx.config
    dq = None
    if ctx.needs_input_grad[1]:
        dq = torch.ops.semiseg.spatial_kl_backward(grad, p, q, lse, weight, temperature, tau,
                                                   ignore, reduction, impl)
    return None, dq, None, None, None, None, None


_spatial_kl_op.register_autograd(_backward, setup_context=_setup_context)


def spatial_kl(p: Tensor, q: Tensor, temperature: float = 4.0, tau: float = 0.8,
               ignore: Tensor | None = None, reduction: str = "mean", *,
               impl: str | None = None) -> Tensor:
    """IPixMatch loss of student logits ``q`` against teacher logits ``p``.

    ``p``, ``q`` float [B, C, H, W] (one dtype, one device); ``ignore`` bool [B, H, W] (True =
    excluded) removes pixels from the confident set; ``tau`` is the teacher-confidence threshold
    (strict ``>``). Returns, in the dtype of ``q``, a 0-d tensor [] for ``reduction``
    "mean"/"sum", [B] for "none". Images with fewer than two confident pixels contribute 0. Only
    ``q`` gets a gradient. ``impl``: see ``use_impl``.
    """
    d.check_float("p", p, "teacher logits [B, C, H, W]", 4)
    d.check_like("q", q, "p", p)
    d.check_shape("q", q, p.shape, "the shape of p [B, C, H, W]")
    if p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"p: expected at least one image and one class, got {tuple(p.shape)}")
    temperature = d.check_positive("temperature", temperature)
    tau = d.check_real("tau", tau)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau: expected a confidence threshold in [0, 1], got {tau}")
    if ignore is not None:
        d.check_like("ignore", ignore, "p", p, dtype=False)
        d.check_dtype("ignore", ignore, (torch.bool,))
        b, _, h, w = p.shape
        d.check_shape("ignore", ignore, (b, h, w), "[B, H, W]")
    d.check_choice("reduction", reduction, _REDUCTIONS)
    mode = _PATH.resolve(impl, "spatial_kl", "spatial_kl_backward")
    return torch.ops.semiseg.spatial_kl(p.detach(), q, temperature, tau, ignore, reduction, mode)[0]


__all__ = ["spatial_kl"]
