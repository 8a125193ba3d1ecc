"""Public differentiable ops of the four hot paths (spec/methods.md section 5).

``from semiseg_fast import ops`` gives the losses and statistics as ``torch.library`` custom ops
(namespace ``semiseg``) with fake and autograd registrations, so they run eagerly, under
``torch.compile(fullgraph=True)`` and with ``torch.library.opcheck``:

=========================  =====================================================  ============
Python entry               custom ops                                             gradient
=========================  =====================================================  ============
``spatial_kl``             ``spatial_kl`` (+ ``_backward``)                       closed form
``entropy_percentile``     ``entropy_percentile``                                 none
``percentile``             ``percentile``                                         none
``rank_mask``              ``rank_mask``                                          none
``teacher_stats``          ``teacher_stats``                                      none
``sampled_contrast``       ``sampled_contrast`` (+ ``_backward``)                 closed form
``class_bank_contrast``    ``class_bank_contrast`` (+ ``_backward``)              closed form
``graph_propagate``        ``graph_mix``, ``class_propagate`` (+ ``_backward``)   closed form
=========================  =====================================================  ============

Every entry validates its inputs in Python (errors name the argument), takes explicit index
tensors where the method samples, and picks its implementation through one switch:
``impl=`` on the call, the :func:`use_impl` context, or ``SEMISEG_IMPL`` ("auto", "reference",
"triton"; see ``_dispatch``). "auto" runs the fused kernels (``kernels/``) on the CUDA tensors
they take and the references (``semiseg_fast.reference``) otherwise; "triton" forces the kernels
(on CPU through the Triton interpreter) and raises NotImplementedError naming the op where none
can run: Triton not importable, or inputs a kernel does not take (e.g. float64 for the
percentile's 32-bit radix keys).
"""
from ._dispatch import IMPLS, register_kernel, requested_mode, use_impl
from .contrast import class_bank_contrast, sampled_contrast
from .entropy_percentile import (
    TeacherStats,
    entropy_percentile,
    percentile,
    rank_mask,
    teacher_stats,
)
from .graph import class_propagate, graph_mix, graph_propagate
from .spatial_kl import spatial_kl

__all__ = [
    "IMPLS",
    "TeacherStats",
    "class_bank_contrast",
    "class_propagate",
    "entropy_percentile",
    "graph_mix",
    "graph_propagate",
    "percentile",
    "rank_mask",
    "register_kernel",
    "requested_mode",
    "sampled_contrast",
    "spatial_kl",
    "teacher_stats",
    "use_impl",
]
