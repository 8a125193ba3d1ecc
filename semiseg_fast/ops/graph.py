"""MLLC graph propagation (one G2Net layer) as custom ops (spec/methods.md 5b).

Every op takes one graph (nodes [N, *]) or a batch of independent graphs of the same size
(nodes [B, N, *], labels and masks [B, N]): MLLC's per-image graphs run as one batch, so the
kernels launch once per pass for all images instead of once per image.

Custom ops cannot take the layer's 1x1-conv modules, and the class graph of the second half is
built from the *output* of ``conv_z``, so the layer is two ops with the convs applied between
and after them, in Python, by :func:`graph_propagate`:

    Z', y, m = semiseg::graph_mix(Z, F, eta)        Z' = m (0.2 A^Z + 0.8 Z)
                                                           + (1 - m)(0.8 A^Z + 0.2 Z)
    Z''      = conv_z(Z')                           (autograd of the module)
    F'       = semiseg::class_propagate(Z'', y, F)  F' = Q^ F, Q^ from softmax(Z'') and y
    F''      = conv_f(F')                           (autograd of the module)

A^ (semantic kNN graph of F), the confidence mask m, the labels y and Q^ are computed without
gradient as in the official code. The backward ops use the closed form of
:func:`semiseg_fast.reference.graph_propagate_grad` (dZ = A^(l1 g) + l2 g, dF = Q^ g; both graphs
symmetric); each op owns one half of it. No N x N matrix crosses an op boundary, so the
backward recomputes its graph from the saved inputs (the fused kernels stream its tiles again
from O(N) per-node data, kernels/graph.py). F gets its gradient through ``class_propagate``
only; Z'' feeds that op as a constant. Under "auto" on CUDA both masks of the class graph run
fused (the official one streamed by the kernels, the intended one by its rank-C torch form
:func:`semiseg_fast.reference.class_graph_lowrank`, here, wherever the kernels would run); k > 64
runs the reference semantic graph.

What is not a graph product is computed here, once, for the kernels and the references alike:
the confidence rule, the mix and its weights (``reference.confidence_mask``, ``mix``,
``mix_weights``) and the official one-hot OH' (``reference.official_onehot``). They run in the
dtype the launch computed in (float32 from the kernels, the reference's compute dtype otherwise),
read from its output, so the kernels' float32 arithmetic is what it was when they did it.

Precision: float32/float64 compute in their own dtype; bf16/fp16 compute in float32 and
results and gradients come back in the input dtype.

Kernel launcher signatures (``LAUNCHERS`` of kernels/graph.py; the reference bodies here take
the same arguments and compute in ``compute_dtype``, the kernels in float32):
``graph_mix(Z, F, k) -> (A^ Z, state)``, ``graph_mix_backward(grad, l1, F, k, state) -> A^ (l1
grad)`` (state [N, 2] float32: the kernel's theta and d^-1/2, which its backward reuses; zeros
from the reference, whose backward rebuilds the dense graph; the backward op takes state=None,
then the kernel rebuilds its graph too), ``class_propagate(logits, onehot, F) -> Q^ F`` and
``class_propagate_backward(grad, logits, onehot) -> Q^ grad`` with the mask of the one-hot rows
``onehot`` (the official layout's OH').
"""
import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..reference import graph as ref
from . import _dispatch as d

try:
    from ..kernels import graph as _kernels
except ImportError as exc:  # no Triton on this platform: the references serve every call
    _kernels = exc
_PATH = d.HotPath("graph", _kernels)


Conv = Callable[[Tensor], Tensor]


def _per_image(*batched: int) -> Callable[[Callable], Callable]:
    """Run a one-graph reference on each graph of a batch. A batch is recognised by a 3-D first
    argument; the arguments at the positions ``batched`` are then sliced per image (None stays
    None), the others are shared, and the outputs are stacked."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args):
            if args[0].dim() == 2:
                return fn(*args)
            outs = [fn(*(a[i] if j in batched and a is not None else a for j, a in enumerate(args)))
                    for i in range(args[0].shape[0])]
            if isinstance(outs[0], tuple):
                return tuple(torch.stack(parts) for parts in zip(*outs))
            return torch.stack(outs)
        return run
    return wrap


@_per_image(0, 1)
def _reference_mix(Z: Tensor, F: Tensor, k: int) -> tuple[Tensor, Tensor]:
    dt = d.compute_dtype(Z.dtype)
    a_hat = ref.semantic_graph(F.to(dt), k)
    # The reference keeps no per-node graph state: its backward rebuilds the dense graph.
    return a_hat @ Z.to(dt), Z.new_zeros((Z.shape[0], 2), dtype=torch.float32)


@_per_image(0, 1, 2, 4)
def _reference_mix_backward(grad: Tensor, l1: Tensor, F: Tensor, k: int,
                            state: Tensor | None) -> Tensor:
    dt = d.compute_dtype(grad.dtype)
    a_hat = ref.semantic_graph(F.to(dt), k)
    return a_hat @ (l1.to(dt) * grad.to(dt))


def _class_graph(logits: Tensor, y: Tensor) -> Tensor:
    return ref.class_graph(torch.softmax(logits, dim=1), y)


@_per_image(0, 1, 2)
def _reference_intended(logits: Tensor, y: Tensor, X: Tensor) -> Tensor:
    dt = d.compute_dtype(X.dtype)
    q_hat = _class_graph(logits.to(dt), y)
    return (q_hat @ X.to(dt)).to(X.dtype)


def _lowrank_intended(logits: Tensor, y: Tensor, X: Tensor, num_labels: int) -> Tensor:
    return ref.class_graph_lowrank(torch.softmax(logits.float(), dim=-1), y, X.float(), num_labels).to(X.dtype)


def _propagate_intended(op: str, impl: str, logits: Tensor, y: Tensor, X: Tensor, num_labels: int) -> Tensor:
    """Q^ X under the intended mask for ``op`` (either direction: Q^ is symmetric, dF = Q^ g).
    Where the kernels would run, its fused form is the rank-C torch form (P2 >= 0 makes the graph
    rank C per class: two GEMMs); the kernels stream only the official mask, which is not
    low-rank."""
    args = (logits.contiguous(), y.contiguous(), X.contiguous())  # as a launch hands them on
    if _PATH.launcher(op, impl, X.device) is not None:
        return _lowrank_intended(*args, num_labels)
    return _reference_intended(*args)


@_per_image(0, 1, 2)
def _reference_propagate(logits: Tensor, onehot: Tensor, F: Tensor) -> Tensor:
    dt = d.compute_dtype(F.dtype)
    q_hat = ref.class_graph_onehot(torch.softmax(logits.to(dt), dim=1), onehot)
    return (q_hat @ F.to(dt)).to(F.dtype)


@_per_image(0, 1, 2)
def _reference_propagate_backward(grad: Tensor, logits: Tensor, onehot: Tensor) -> Tensor:
    dt = d.compute_dtype(grad.dtype)
    q_hat = ref.class_graph_onehot(torch.softmax(logits.to(dt), dim=1), onehot)
    return (q_hat @ grad.to(dt)).to(grad.dtype)


def _nan_where_features_are_not_finite(out: Tensor, F: Tensor) -> Tensor:
    """``out`` [N, C] (or [B, N, C]) NaN for every node of a graph whose features ``F`` float [N, D]
    hold a NaN or inf: what the dense reference's similarities give, where the kernels' masked
    top-k would drop the node and hide it."""
    bad = ~torch.isfinite(F).flatten(-2).all(-1)
    return torch.where(bad.view(*bad.shape, 1, 1), float("nan"), out)


@torch.library.custom_op("semiseg::graph_mix", mutates_args=())
def _mix_op(Z: Tensor, F: Tensor, eta: Tensor, k: int, threshold: float,
            impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    Z = Z.contiguous()  # the layout the fake promises for Z', whatever the mix below is given
    z_graph, state = _PATH.launch("graph_mix", impl, Z.device, _reference_mix, Z, F, k)
    z_graph = _nan_where_features_are_not_finite(z_graph, F)
    z = Z.to(z_graph.dtype)
    mask, y = ref.confidence_mask(z, eta, threshold)
    return ref.mix(z, z_graph, mask).to(Z.dtype), y, mask, state


@_mix_op.register_fake
def _(Z, F, eta, k, threshold, impl):
    nodes = Z.shape[:-1]
    return (Z.new_empty(Z.shape), Z.new_empty(nodes, dtype=torch.int64),
            Z.new_empty(nodes, dtype=torch.bool), Z.new_empty((*nodes, 2), dtype=torch.float32))


@torch.library.custom_op("semiseg::graph_mix_backward", mutates_args=())
def _mix_backward_op(grad: Tensor, F: Tensor, mask: Tensor, k: int, impl: str,
                     state: Tensor | None = None) -> Tensor:
    grad = grad.contiguous()  # as the launch would make it: the sum below keeps its layout
    # the weights in the reference's dtype; their float32 copy in the kernels is bit for bit the
    # float32 weights (0.2 and 0.8 round alike), which the kernels computed themselves before
    l1, l2 = ref.mix_weights(mask, d.compute_dtype(grad.dtype))
    spread = _PATH.launch("graph_mix_backward", impl, grad.device, _reference_mix_backward,
                          grad, l1, F, k, state)
    spread = _nan_where_features_are_not_finite(spread, F)
    return (spread + l2.to(spread.dtype) * grad.to(spread.dtype)).to(grad.dtype)


@_mix_backward_op.register_fake
def _(grad, F, mask, k, impl, state=None):
    return grad.new_empty(grad.shape)


def _mix_setup(ctx, inputs, output):
    _, F, _, k, _, impl = inputs
    ctx.save_for_backward(F, output[2], output[3])
    ctx.config = (k, impl)


def _mix_backward(ctx, grad_mixed, grad_y, grad_mask, grad_state):
    F, mask, state = ctx.saved_tensors
    k, impl = ctx.config
    grad_z = None
    if ctx.needs_input_grad[0] and grad_mixed is not None:
        # same impl, device and k as the forward, so the state comes from the same implementation
        grad_z = torch.ops.semiseg.graph_mix_backward(grad_mixed, F, mask, k, impl, state)
    return grad_z, None, None, None, None, None


_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup)


def _official_onehot(logits: Tensor, y: Tensor, h: int, w: int) -> Tensor:
    return ref.official_onehot(y.long(), logits.shape[-1], h, w)


@torch.library.custom_op("semiseg::class_propagate", mutates_args=())
def _propagate_op(logits: Tensor, y: Tensor, F: Tensor, official_layout: bool,
                  h: int | None, w: int | None, impl: str, num_labels: int = 0) -> Tensor:
    # num_labels: the range of y, 0 = the logits' classes C'
    if not official_layout:
        return _propagate_intended("class_propagate", impl, logits, y, F, num_labels or logits.shape[-1])
    return _PATH.launch("class_propagate", impl, F.device, _reference_propagate,
                        logits, _official_onehot(logits, y, h, w), F)


@_propagate_op.register_fake
def _(logits, y, F, official_layout, h, w, impl, num_labels=0):
    return F.new_empty(F.shape)


@torch.library.custom_op("semiseg::class_propagate_backward", mutates_args=())
def _propagate_backward_op(grad: Tensor, logits: Tensor, y: Tensor, official_layout: bool,
                           h: int | None, w: int | None, impl: str, num_labels: int = 0) -> Tensor:
    if not official_layout:
        return _propagate_intended("class_propagate_backward", impl, logits, y, grad,
                                   num_labels or logits.shape[-1])
    return _PATH.launch("class_propagate_backward", impl, grad.device,
                        _reference_propagate_backward, grad, logits, _official_onehot(logits, y, h, w))


@_propagate_backward_op.register_fake
def _(grad, logits, y, official_layout, h, w, impl, num_labels=0):
    return grad.new_empty(grad.shape)


def _propagate_setup(ctx, inputs, output):
    logits, y, _, official_layout, h, w, impl, num_labels = inputs
    ctx.save_for_backward(logits, y)
    ctx.config = (official_layout, h, w, num_labels, impl)


def _propagate_backward(ctx, grad):
    logits, y = ctx.saved_tensors
    official_layout, h, w, num_labels, impl = ctx.config
    grad_f = None
    if ctx.needs_input_grad[2]:
        grad_f = torch.ops.semiseg.class_propagate_backward(grad, logits, y, official_layout,
                                                            h, w, impl, num_labels)
    return None, None, grad_f, None, None, None, None, None


_propagate_op.register_autograd(_propagate_backward, setup_context=_propagate_setup)


def _check_layout(n: int, official_layout: bool, h: int | None, w: int | None) -> None:
    if not isinstance(official_layout, bool):
        raise TypeError(f"official_layout: expected a bool, got {type(official_layout).__name__}")
    if (h is None) != (w is None):
        raise ValueError("h, w: expected both or neither")
    if h is not None:
        d.check_int("h", h)
        d.check_int("w", w)
        if h < 1 or w < 1 or h * w != n:
            raise ValueError(f"h, w: expected h * w = N = {n}, got {h} * {w}")
    if official_layout and h is None:
        raise ValueError("h, w: official_layout=True needs the map size h, w")


def _check_rows(name: str, x: Tensor, layout: str, like: tuple[str, Tensor] | None = None) -> None:
    """x is node rows [N, ch] (one graph) or [B, N, ch] (B graphs), with the graph and node
    dimensions of ``like`` = (its name, tensor) when given."""
    ndim = x.dim() if isinstance(x, Tensor) and x.dim() in (2, 3) else 2  # else check_float raises
    d.check_float(name, x, f"{layout} (one graph) or [B, {layout[1:]} (a batch of graphs)", ndim)
    if like is not None and x.shape[:-1] != like[1].shape[:-1]:
        raise ValueError(f"{name}: expected the graphs and nodes of {like[0]}, {tuple(like[1].shape[:-1])}, "
                         f"got {tuple(x.shape)}")


def _check_nodes(Z: Tensor, F: Tensor) -> None:
    _check_rows("Z", Z, "[N, C]")
    _check_rows("F", F, "[N, D]", ("Z", Z))
    d.check_like("F", F, "Z", Z)
    if Z.numel() == 0:
        raise ValueError(f"Z: expected at least one graph, node and class, got {tuple(Z.shape)}")
    if F.shape[-1] < 1:
        raise ValueError(f"F: expected D >= 1 feature columns, got {tuple(F.shape)}")


def graph_mix(Z: Tensor, F: Tensor, eta: Tensor, k: int = 21, threshold: float = 0.95, *,
              impl: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """First half of the layer: (``Z'`` [N, C] in Z's dtype, ``y`` int64 [N], ``m`` bool [N]) from
    logits ``Z`` float [N, C], features ``F`` float [N, D] (Z's dtype) and thresholds ``eta`` float
    [C] (or [B, N, *], [B, N]: B graphs of N nodes each, all in one launch per pass).

    m_i = [conf_i >= threshold or conf_i >= eta_{y_i}], y = argmax softmax(Z) (first on ties),
    A^ = normalised symmetric kNN graph of F (k neighbours incl. self). Z gets the gradient
    A^(l1 g) + l2 g; F and eta get none here.
    """
    _check_nodes(Z, F)
    n, c = Z.shape[-2:]
    d.check_tensor("eta", eta)
    d.check_like("eta", eta, "Z", Z, dtype=False)
    if eta.dtype not in d.FLOAT_DTYPES:
        raise TypeError(f"eta: expected a floating dtype, got {eta.dtype}")
    d.check_shape("eta", eta, (c,), "[C]")
    k = d.check_int("k", k)
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= N = {n} nodes, got {k}")
    threshold = d.check_real("threshold", threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a confidence in [0, 1], got {threshold}")
    mode = _PATH.resolve(impl, "graph_mix", "graph_mix_backward")
    mixed, y, mask, _ = torch.ops.semiseg.graph_mix(Z, F.detach(), eta.detach(), k, threshold, mode)
    return mixed, y, mask


def class_propagate(logits: Tensor, y: Tensor, F: Tensor, official_layout: bool = False,
                    h: int | None = None, w: int | None = None, *, num_labels: int | None = None,
                    impl: str | None = None) -> Tensor:
    """Second half of the layer: ``F'`` = Q^ F [N, D] in F's dtype, Q^ the class graph of
    softmax(logits), y.

    ``logits`` float [N, C'] (the output of conv_z; a constant here), ``y`` int32 or int64 [N]
    labels from :func:`graph_mix`, ``F`` float [N, D] (or [B, N, *], [B, N]: B graphs). M_ij = [y_i = y_j] by default;
    ``official_layout=True`` (needs h, w) reproduces the official scrambled mask. F gets the
    gradient Q^ g. ``y`` holds values in [0, ``num_labels``), default C' (graph_propagate passes
    Z's C, which a channel-reducing conv_z makes larger than C').
    """
    _check_rows("logits", logits, "[N, C]")
    _check_rows("F", F, "[N, D]", ("logits", logits))
    d.check_like("F", F, "logits", logits, dtype=False)
    d.check_tensor("y", y)
    d.check_like("y", y, "logits", logits, dtype=False)
    d.check_dtype("y", y, d.INDEX_DTYPES)
    nodes = tuple(logits.shape[:-1])
    d.check_shape("y", y, nodes, "[N]" if len(nodes) == 1 else "[B, N]")
    _check_layout(nodes[-1], official_layout, h, w)
    c = logits.shape[-1]
    num_labels = c if num_labels is None else d.check_int("num_labels", num_labels)
    if num_labels < 1 or (official_layout and num_labels != c):
        raise ValueError(f"num_labels: expected {'C' if official_layout else 'an int >= 1, default C'} = {c} "
                         f"(the official layout's one-hot has the logits' classes), got {num_labels}")
    d.check_range("y", y, 0, num_labels, f"labels in [0, {num_labels})")
    mode = _PATH.resolve(impl, "class_propagate", "class_propagate_backward")
    return torch.ops.semiseg.class_propagate(logits.detach(), y, F, official_layout, h, w, mode, num_labels)


def _pointwise(conv: Conv, x: Tensor, h: int, w: int) -> Tensor:
    """Apply a 1x1-conv callable on NCHW [B, ch, h, w] to node rows x [N, ch] (B = 1) or [B, N, ch]."""
    rows = x if x.dim() == 3 else x[None]
    out = conv(rows.transpose(1, 2).reshape(rows.shape[0], rows.shape[2], h, w))
    out = out.flatten(2).transpose(1, 2)
    return out if x.dim() == 3 else out[0]


def graph_propagate(Z: Tensor, F: Tensor, eta: Tensor, conv_z: Conv, conv_f: Conv,
                    k: int = 21, official_layout: bool = False, h: int | None = None,
                    w: int | None = None, threshold: float = 0.95, *,
                    impl: str | None = None) -> tuple[Tensor, Tensor]:
    """One G2Net layer on one image, as ``reference.graph_propagate`` (same arguments), or on a
    batch of images, each its own graph.

    ``Z`` float [N, C] logits, ``F`` float [N, D] embeddings in Z's dtype (or [B, N, C],
    [B, N, D]), ``eta`` float [C] per-class thresholds; conv_z / conv_f are callables on NCHW
    [B, ch, h, w] (the map is [B, ch, N, 1] without h, w, which is the same for 1x1 convs),
    applied outside the ops so their parameters train by ordinary autograd. Returns (``Z''``
    [N, C'], ``F''`` [N, D']) (or [B, N, *]) in the dtype the convs give.
    """
    _check_nodes(Z, F)
    n = Z.shape[-2]
    _check_layout(n, official_layout, h, w)
    if not callable(conv_z) or not callable(conv_f):
        raise TypeError("conv_z, conv_f: expected callables on [B, ch, h, w] tensors")
    hh, ww = (n, 1) if h is None else (h, w)
    z_mixed, y, _ = graph_mix(Z, F, eta, k, threshold, impl=impl)
    z_out = _pointwise(conv_z, z_mixed, hh, ww)
    if official_layout and z_out.shape[-1] != Z.shape[-1]:
        raise ValueError(f"conv_z: the official layout needs conv_z to keep the C = {Z.shape[-1]} classes, "
                         f"got {z_out.shape[-1]} channels")
    f_graph = class_propagate(z_out, y, F, official_layout, h, w, num_labels=Z.shape[-1], impl=impl)
    return z_out, _pointwise(conv_f, f_graph, hh, ww)


__all__ = ["class_propagate", "graph_mix", "graph_propagate"]
