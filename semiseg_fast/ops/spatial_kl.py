"""IPixMatch spatial softmax KL as a differentiable custom op (spec/methods.md 5c).

Ops: ``semiseg::spatial_kl`` and ``semiseg::spatial_kl_backward``. The backward is the
reference's closed form :func:`semiseg_fast.reference.spatial_kl_grad`
(dL/dq_kj = (softmax_j(q_k/t) - pi_kj) / (t C ln|Omega|) on Omega, 0 elsewhere); the teacher
logits ``p`` get no gradient. Semantics (Omega, degenerate images, reductions) are the
reference's, see its module docstring.

Precision: float32/float64 compute in their own dtype; bf16/fp16 inputs compute in float32 and
the loss (and the gradient of ``q``) come back in the input dtype.

Kernel launcher signatures (``LAUNCHERS`` of kernels/spatial_kl.py):
``spatial_kl(p, q, temperature, tau, ignore, reduction) -> loss`` and
``spatial_kl_backward(grad, p, q, temperature, tau, ignore, reduction) -> dq``.
"""

import torch
from torch import Tensor

from .. import reference as ref
from . import _dispatch as d

_PATH = d.HotPath("spatial_kl")
_REDUCTIONS = ("mean", "sum", "none")


def _reference_forward(p: Tensor, q: Tensor, temperature: float, tau: float,
                       ignore: Tensor | None, reduction: str) -> Tensor:
    dt = d.compute_dtype(q.dtype)
    loss = ref.spatial_kl(p.to(dt), q.to(dt), temperature, tau, ignore, reduction)
    return loss.to(q.dtype)


def _reference_backward(grad: Tensor, p: Tensor, q: Tensor, temperature: float, tau: float,
                        ignore: Tensor | None, reduction: str) -> Tensor:
    dt = d.compute_dtype(q.dtype)
    dq = ref.spatial_kl_grad(p.to(dt), q.to(dt), temperature, tau, ignore, reduction,
                             grad_output=grad.to(dt))
    return dq.to(q.dtype).contiguous()


@torch.library.custom_op("semiseg::spatial_kl", mutates_args=())
def _spatial_kl_op(p: Tensor, q: Tensor, temperature: float, tau: float,
                   ignore: Tensor | None, reduction: str, impl: str) -> Tensor:
    return _PATH.launch("spatial_kl", impl, q.device, _reference_forward,
                        p, q, temperature, tau, ignore, reduction)


@_spatial_kl_op.register_fake
def _(p, q, temperature, tau, ignore, reduction, impl):
    return q.new_empty((q.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("semiseg::spatial_kl_backward", mutates_args=())
def _spatial_kl_backward_op(grad: Tensor, p: Tensor, q: Tensor, temperature: float, tau: float,
                            ignore: Tensor | None, reduction: str, impl: str) -> Tensor:
    return _PATH.launch("spatial_kl_backward", impl, q.device, _reference_backward,
                        grad, p, q, temperature, tau, ignore, reduction)


@_spatial_kl_backward_op.register_fake
def _(grad, p, q, temperature, tau, ignore, reduction, impl):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    p, q, temperature, tau, ignore, reduction, impl = inputs
    ctx.save_for_backward(p, q, ignore)
    ctx.config = (temperature, tau, reduction, impl)


def _backward(ctx, grad):
    p, q, ignore = ctx.saved_tensors
    temperature, tau, reduction, impl = ctx.config
    dq = None
    if ctx.needs_input_grad[1]:
        dq = torch.ops.semiseg.spatial_kl_backward(grad, p, q, temperature, tau, ignore,
                                                   reduction, impl)
    return None, dq, None, None, None, None, None


_spatial_kl_op.register_autograd(_backward, setup_context=_setup_context)


def spatial_kl(p: Tensor, q: Tensor, temperature: float = 4.0, tau: float = 0.8,
               ignore: Tensor | None = None, reduction: str = "mean", *,
               impl: str | None = None) -> Tensor:
    """IPixMatch loss of student logits ``q`` against teacher logits ``p``, both [B, C, H, W].

    ``ignore`` (bool [B, H, W], True = excluded) removes pixels from the confident set; ``tau``
    is the teacher-confidence threshold (strict ``>``). Returns a scalar for ``reduction``
    "mean"/"sum", a [B] vector for "none", in the dtype of ``q``. Images with fewer than two
    confident pixels contribute 0. Only ``q`` gets a gradient. ``impl``: see ``use_impl``.
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
    return torch.ops.semiseg.spatial_kl(p.detach(), q, temperature, tau, ignore, reduction, mode)


__all__ = ["spatial_kl"]
