"""IPixMatch spatial softmax KL as a differentiable custom op (spec/methods.md 5c).

Ops: ``semiseg::spatial_kl`` returns the loss together with the per-row statistics the gradient
needs, LSE [B, 2, C] (teacher and student log-sum-exp over Omega at temperature t, float32) and
the per-image weight 1 / (C ln |Omega|) [B] (0 when |Omega| < 2); ``semiseg::spatial_kl_backward``
takes them back, so the fused backward reads p and q once and writes dq once instead of
recomputing the statistics (5 instead of 7 tensor-sized transfers over forward + backward).
The reference backward is the closed form :func:`semiseg_fast.reference.spatial_kl_grad`
(dL/dq_kj = (softmax_j(q_k/t) - pi_kj) / (t C ln|Omega|) on Omega, 0 elsewhere) and ignores
the statistics; the teacher logits ``p`` get no gradient. Semantics (Omega, degenerate images,
reductions) are the reference's, see its module docstring.

Precision: float32/float64 compute in their own dtype; bf16/fp16 inputs compute in float32 and
the loss (and the gradient of ``q``) come back in the input dtype.

Kernel launcher signatures (``LAUNCHERS`` of kernels/spatial_kl.py):
``spatial_kl(p, q, temperature, tau, ignore, reduction) -> (loss, lse, weight)`` and
``spatial_kl_backward(grad, p, q, lse, weight, temperature, tau, ignore, reduction) -> dq``.
"""

import torch
from torch import Tensor

from .. import reference as ref
from . import _dispatch as d

try:
    from ..kernels import spatial_kl as _kernels
except ImportError as exc:  # no Triton on this platform: the references serve every call
    _kernels = exc
_PATH = d.HotPath("spatial_kl", _kernels)
_REDUCTIONS = ("mean", "sum", "none")


def _statistics(p: Tensor, q: Tensor, temperature: float, tau: float,
                ignore: Tensor | None) -> tuple[Tensor, Tensor]:
    """LSE [B, 2, C] of p/t and q/t over Omega and the weight 1/(C ln|Omega|) [B], float32."""
    b, c = p.shape[:2]
    omega = ref.confident_set(p, tau, ignore).unsqueeze(1)
    lse = torch.stack([torch.logsumexp(torch.where(omega, x.flatten(2) / temperature, float("-inf")), -1)
                       for x in (p, q)], dim=1)
    n = omega.sum(-1).squeeze(1).double()
    weight = torch.where(n >= 2, 1.0 / (c * torch.log(n.clamp(min=2))), 0.0)
    return lse.float(), weight.float()


def _reference_forward(p: Tensor, q: Tensor, temperature: float, tau: float,
                       ignore: Tensor | None, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    dt = d.compute_dtype(q.dtype)
    loss = ref.spatial_kl(p.to(dt), q.to(dt), temperature, tau, ignore, reduction)
    lse, weight = _statistics(p.to(dt), q.to(dt), temperature, tau, ignore)
    return loss.to(q.dtype), lse, weight


def _reference_backward(grad: Tensor, p: Tensor, q: Tensor, lse: Tensor, weight: Tensor,
                        temperature: float, tau: float, ignore: Tensor | None,
                        reduction: str) -> Tensor:
    dt = d.compute_dtype(q.dtype)
    dq = ref.spatial_kl_grad(p.to(dt), q.to(dt), temperature, tau, ignore, reduction,
                             grad_output=grad.to(dt))
    return dq.to(q.dtype).contiguous()


@torch.library.custom_op("semiseg::spatial_kl", mutates_args=())
def _spatial_kl_op(p: Tensor, q: Tensor, temperature: float, tau: float,
                   ignore: Tensor | None, reduction: str, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    return _PATH.launch("spatial_kl", impl, q.device, _reference_forward,
                        p, q, temperature, tau, ignore, reduction)


@_spatial_kl_op.register_fake
def _(p, q, temperature, tau, ignore, reduction, impl):
    b, c = p.shape[:2]
    loss = q.new_empty((b,) if reduction == "none" else ())
    return loss, q.new_empty((b, 2, c), dtype=torch.float32), q.new_empty((b,), dtype=torch.float32)


@torch.library.custom_op("semiseg::spatial_kl_backward", mutates_args=())
def _spatial_kl_backward_op(grad: Tensor, p: Tensor, q: Tensor, lse: Tensor, weight: Tensor,
                            temperature: float, tau: float, ignore: Tensor | None,
                            reduction: str, impl: str) -> Tensor:
    return _PATH.launch("spatial_kl_backward", impl, q.device, _reference_backward,
                        grad, p, q, lse, weight, temperature, tau, ignore, reduction)


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
    return torch.ops.semiseg.spatial_kl(p.detach(), q, temperature, tau, ignore, reduction, mode)[0]


__all__ = ["spatial_kl"]
