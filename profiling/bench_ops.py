"""Op benchmark: fused kernels against the eager and the torch.compile-d reference.

    python -m profiling.bench_ops                      # every op, realistic shapes, appends CSV rows
    python -m profiling.bench_ops --op spatial_kl --dtype bf16
    python -m profiling.bench_ops --smoke              # tiny shapes, any device (CPU: interpreter)

For each case, provider and mode it records the median time with p20/p80 (``triton.testing.do_bench`` on CUDA, a
perf-counter loop elsewhere), the peak memory above the inputs, and the achieved GB/s against the
op's bytes floor; the device copy bandwidth is measured in the same run, so each row also says which
fraction of the memory system the op reaches. Rows are appended to
``profiling/results/<device>.csv`` with device, torch, triton, commit and date.

Providers: ``fused`` (the Triton kernels), ``reference`` (the eager references through the ops),
``compiled`` (a ``torch.compile``d reference: spatial KL ``fullgraph=True`` of a loop-free PyTorch
formulation, since the references read sizes on the host, providers checked to agree first; the
graph layer, the contrasts and the entropy's sort-based formulation compiled as they are, the last
three on CUDA only: see ``COMPILED_ON_CPU``), and where an official code path exists ``official``
(entropy percentile: U2PL's device-to-host copy and ``numpy.percentile``; graph: the official dense
layer). Class-bank contrast adds ``matmul`` (its own product in PyTorch, a same-shape ceiling) and
the entropy ``sort`` / ``fused_cuda`` on CUDA. Modes: ``fwd``, ``bwd``, ``fwd+bwd`` for losses,
``fwd`` for statistics, ``graph`` for the MLLC similarity passes alone. A case builder gives a
provider it cannot run a reason string instead of closures (the dense graph providers at 64k nodes):
the rows record it in ``note`` with no time.

Class-bank contrast (5a, CTT) and the MLLC semantic graph (5b) are GEMM-bound: their rows give
TFLOP/s for the useful products (contrast: anchors x bank, forward 1, backward 2; graph: the
similarity and A^ Z, once each direction) against a square matmul at the same precision timed in
the same run.

Bytes floors. Entropy percentile (5d): one read of the logits. Sampled contrast (5a): the sampled
anchor, prototype and negative rows read once (plus the anchor gradient written once in backward). Spatial KL (5c): spatial KL forward reads p and q once (2 N elements, N = B C H W);
the backward reads p and q and writes dq (3 N); forward + backward together: p and q read once and
dq written once (3 N). The fused path reads p and q in the forward and again in the backward
(which takes the forward's per-row statistics) and writes dq: 5 N, 1.67x the floor by bytes.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from semiseg_fast import ops
from semiseg_fast import reference as ref

from .harness import (
    append_rows,
    device_label,  # noqa: F401  (profiling/tune.py takes it from here)
    peak_memory,
    results_path,
    stamp,
    time_op,
)

# profiling/tune.py reaches the stamp and the op timer through this module, under these names
_environment, _timer = stamp, time_op

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# The compiled-reference providers of the entropy and contrast ops join the CUDA runs only: inductor
# needs tens of seconds per case on a 2-core CPU, too much for a smoke run; tests switch it on to
# check that they run.
COMPILED_ON_CPU = False


_SKIP_COMPILED = False


@contextlib.contextmanager
def without_compiled() -> Iterator[None]:
    """Cases built inside leave out their compiled-reference providers (profiling/tune.py times the
    fused provider alone and would otherwise compile a reference per kernel configuration)."""
    global _SKIP_COMPILED
    _SKIP_COMPILED = True
    try:
        yield
    finally:
        _SKIP_COMPILED = False


def _with_compiled(device: torch.device, everywhere: bool = False) -> bool:
    """Whether a case adds its compiled-reference provider: on CUDA, and on CPU for the cheap ones
    (``everywhere``) or when a test asks (COMPILED_ON_CPU)."""
    return not _SKIP_COMPILED and (everywhere or device.type == "cuda" or COMPILED_ON_CPU)


def copy_bandwidth(device: torch.device, mb: int = 1024) -> float:
    """GB/s of a device-to-device copy (read + write counted), the practical ceiling."""
    if device.type != "cuda":
        mb = 64
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_op(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (med * 1e-3) / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype, tf32: bool = False) -> float:
    """TFLOP/s of a square matmul at ``dtype`` (fp32 at IEEE precision unless ``tf32``), the
    ceiling the GEMM-bound ops are compared with."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        med, _, _ = time_op(lambda: a @ b, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n**3 / (med * 1e-3) / 1e12


# -- cases ----------------------------------------------------------------------------------------

def spatial_kl_cases(smoke: bool) -> list[tuple[str, tuple[int, int, int, int]]]:
    if smoke:
        return [("smoke", (2, 5, 17, 19))]
    return [("voc321", (8, 21, 321, 321)), ("voc513", (8, 21, 513, 513)), ("city801", (2, 19, 801, 801))]


def spatial_kl_vectorized(p, q, ignore, temperature=4.0, tau=0.8):
    """The op as a PyTorch user would write it without loops or host reads (masked log-softmax
    over pixels), the baseline that ``torch.compile`` gets to fuse. Same semantics as the reference."""
    b, c = p.shape[:2]
    omega = ref.confident_set(p, tau, ignore).unsqueeze(1)  # [B, 1, HW]
    n = omega.sum(-1, dtype=torch.float32)  # [B, 1]
    pk = torch.where(omega, p.flatten(2).float() / temperature, float("-inf"))
    qk = torch.where(omega, q.flatten(2).float() / temperature, float("-inf"))
    log_pi = pk - torch.logsumexp(pk, -1, keepdim=True)
    log_psi = qk - torch.logsumexp(qk, -1, keepdim=True)
    kl = torch.where(omega, log_pi.exp() * (log_pi - log_psi), 0.0).sum((1, 2))
    ok = n.squeeze(1) >= 2
    return torch.where(ok, kl / (c * torch.log(n.squeeze(1).clamp(min=2))), 0.0).mean().to(q.dtype)


def spatial_kl_bench(shape, dtype, device):
    b, c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    p = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    q = torch.randn(shape, generator=g).to(device, dtype)
    ignore = (torch.rand(b, h, w, generator=g) < 0.05).to(device)
    providers = {
        "fused": lambda q_: ops.spatial_kl(p, q_, ignore=ignore, impl="triton"),
        "reference": lambda q_: ref.spatial_kl(p, q_, ignore=ignore),
    }
    if _with_compiled(device, everywhere=True):
        compiled = torch.compile(spatial_kl_vectorized, fullgraph=True)
        providers["compiled"] = lambda q_: compiled(p, q_, ignore)
    # every provider must compute the same loss before any of them is timed
    expected = ref.spatial_kl(p.double(), q.double(), ignore=ignore)
    for name, fn in providers.items():
        got = fn(q).double()
        if not torch.allclose(got, expected, rtol=2e-2, atol=1e-4):
            raise AssertionError(f"spatial_kl provider {name}: {got.item()} != reference {expected.item()}")
    n = p.numel() * p.element_size()
    floors = {"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 3 * n}
    return {name: _loss_modes(fn, q) for name, fn in providers.items()}, floors


U2PL_Q = [80.0, 20.0, 80.0]  # the three thresholds of one U2PL step (drop, low, high at t = 0)


def entropy_percentile_cases(smoke: bool):
    """(name, shape): [B, C, H, W] logits at crop size, or [B, C, h, w, H, W] for 1/4 logits that
    the fused pass up-samples to (H, W) itself (U2PL's real input)."""
    if smoke:  # the up-sampling case: it runs the whole fused path (pass + selection)
        return [("smoke", (2, 5, 5, 6, 17, 19))]
    return [("voc129to513", (4, 21, 129, 129, 513, 513)), ("voc513", (4, 21, 513, 513)),
            ("city769", (2, 19, 769, 769)), ("stress64M", (1, 1, 8192, 8192))]


def entropy_percentile_sorted(values, valid, q):
    """numpy's linear percentiles from one ``torch.sort`` of all values (unselected ones as +inf
    at the end), ranks and lerp on the device: the sort-based way without a host sync."""
    flat = torch.where(valid, values, float("inf")).reshape(-1)
    ordered = torch.sort(flat).values
    last = (valid.sum() - 1).clamp_min(0)
    out = []
    for pct in q:
        r = last.double() * (pct / 100.0)
        lo = torch.minimum(r.floor().long(), last)
        hi = torch.minimum(lo + 1, last)
        g = torch.where(r >= last, r + 1, r - r.floor())
        a, b = ordered[lo], ordered[hi]
        out.append(torch.where(g >= 0.5, b - (b - a) * (1 - g).float(), a + (b - a) * g.float()))
    return torch.stack(out)


def entropy_percentile_bench(shape, dtype, device):
    """Entropy + U2PL's three thresholds; the 1-class stress case times the selection alone
    (its entropy is 0 everywhere, so it runs on the logits as values via ``percentile``).

    Providers: ``fused`` (Triton pass + Triton radix select), ``reference`` (the ops'
    references), ``official`` (U2PL: up-sample, entropy, device-to-host copy,
    ``numpy.percentile`` x 3) and, on CUDA only (timing providers; the CPU smoke run keeps the
    three above, which tests/test_profiling.py pins), ``sort`` (eager up-sample, entropy, one
    ``torch.sort``, no host sync) and ``fused_cuda`` (the C++ radix select of
    csrc/radix_select.cu; absent where it cannot be built).
    Floor: the logits read once plus the entropy map written once (what the op must return)."""
    import importlib

    import numpy as np
    import torch.nn.functional as F

    kernels = importlib.import_module("semiseg_fast.kernels.entropy_percentile")
    b, c, h, w = shape[:4]
    size = tuple(shape[4:]) or (h, w)
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn((b, c, h, w), generator=g) * 3).to(device, dtype)
    valid = (torch.rand(b, *size, generator=g) < 0.9).to(device)

    def up():
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True) if size != (h, w) \
            else logits.float()

    def cuda_select():
        return kernels.use_radix_select("cuda") if device.type == "cuda" else contextlib.nullcontext()

    if c == 1:
        values = logits.reshape(b, h, w)

        def fused(select=contextlib.nullcontext):
            with select():
                return ops.percentile(values, U2PL_Q, valid, impl="triton")

        def sort():
            return entropy_percentile_sorted(values.float(), valid, U2PL_Q)

        providers = {
            "reference": lambda: ops.percentile(values, U2PL_Q, valid, impl="reference"),
            "official": lambda: [np.percentile(values[valid].float().cpu().numpy(), q) for q in U2PL_Q],
        }
        floor = values.numel() * values.element_size()
    else:
        def fused(select=contextlib.nullcontext):
            with select():
                return ops.entropy_percentile(logits, U2PL_Q, valid, size=size, impl="triton")

        def official():
            ent = ref.entropy(up())
            sel = ent[valid].cpu().numpy()
            return ent, [np.percentile(sel, q) for q in U2PL_Q]

        def sort():
            ent = ref.entropy(up())
            return ent, entropy_percentile_sorted(ent, valid, U2PL_Q)

        providers = {
            "reference": lambda: ops.entropy_percentile(up(), U2PL_Q, valid, impl="reference"),
            "official": official,
        }
        floor = logits.numel() * logits.element_size() + b * size[0] * size[1] * 4
    providers = {"fused": fused, **providers}
    if _with_compiled(device):
        providers["compiled"] = torch.compile(sort)  # the sort-based formulation, loop-free
    if device.type == "cuda":
        providers["sort"] = sort
        if kernels._cuda_select() is not None:
            providers["fused_cuda"] = lambda: fused(cuda_select)
    return {name: {"fwd": fn} for name, fn in providers.items()}, {"fwd": floor}


def sampled_contrast_cases(smoke: bool):
    if smoke:
        return [("smoke", (50, 8, 3, 5, 20, 4))]
    # U2PL VOC: 8 x 129^2 pixels, 21 classes x 256 anchors x 50 negatives, queues 50000 + 20 x 30000
    return [("u2pl_voc", (8 * 129 * 129, 256, 21, 256, 50000 + 20 * 30000, 50))]


def sampled_contrast_bench(shape, dtype, device):
    n, d, k, m, rows, nneg = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    anchors = torch.randn(n, d, generator=g).to(device, dtype)
    keys_pos = torch.randn(k, d, generator=g).to(device, dtype)
    bank = torch.randn(rows, d, generator=g).to(device, dtype)
    anchor_idx = torch.randint(0, n, (k, m), generator=g).to(device)
    neg_idx = torch.randint(0, rows, (k, m, nneg), generator=g).to(device)
    providers = {
        "fused": lambda a: ops.sampled_contrast(a, keys_pos, bank, anchor_idx, neg_idx, impl="triton"),
        "reference": lambda a: ops.sampled_contrast(a, keys_pos, bank, anchor_idx, neg_idx, impl="reference"),
    }
    if _with_compiled(device):
        # the reference formulation itself (the op keeps it opaque), in the op's compute dtype
        compiled = torch.compile(ref.sampled_contrast)
        providers["compiled"] = lambda a: compiled(a.float(), keys_pos.float(), bank.float(), anchor_idx, neg_idx,
                                                   num_valid=max(k, 1))  # the op's default divisor
    # gather-bound: every sampled anchor and negative row and the K prototypes read once (the
    # floor of a gather; the forward and the backward each need them), the anchor gradient
    # written once
    gathered = (k * m * (nneg + 1) + k) * d * anchors.element_size()
    floors = {"fwd": gathered, "bwd": gathered + anchors.numel() * anchors.element_size(),
              "fwd+bwd": gathered + anchors.numel() * anchors.element_size()}
    return {name: _loss_modes(fn, anchors) for name, fn in providers.items()}, floors


def class_bank_contrast_cases(smoke: bool):
    """(anchors, D, C, entries per class, mode, fp32 dot precision, time the same-shape matmul);
    a "tf32" case runs for fp32 only."""
    if smoke:  # one case (tests/test_profiling.py counts the smoke rows)
        return [("smoke_hc_tf32", (40, 16, 3, 8, "hc", "tf32", False))]
    # CTT VOC: 10 + 10 images at 41 x 41 = 33,620 anchors; City: 2 + 2 at 33 x 65 = 8,580.
    # HC against [C, Q, D] (Q = 256), LC against both networks' banks [C, 2Q, D].
    return [(f"{data}_{mode}{'_tf32' if precision == 'tf32' else ''}", (n, 256, c, q, mode, precision, True))
            for data, n, c in (("voc", 33620, 21), ("city", 8580, 19))
            for mode, q in (("hc", 256), ("lc", 512))
            for precision in ("ieee", "tf32")]


def class_bank_contrast_precision(fn: Callable, precision: str) -> Callable:
    """``fn`` run under ``torch.set_float32_matmul_precision`` for ``precision`` ("ieee" ->
    "highest", "tf32" -> "high"): the switch the fused op's "auto" and PyTorch's matmuls follow."""
    setting = "highest" if precision == "ieee" else "high"

    @functools.wraps(fn)  # keeps a closure's attributes (the untimed ``gradient`` of _loss_modes)
    def run(*args):
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(setting)
        try:
            return fn(*args)
        finally:
            torch.set_float32_matmul_precision(previous)
    return run


def class_bank_contrast_bench(shape, dtype, device):
    """Fused and eager reference at one fp32 precision (bf16/fp16: the dtype decides), plus
    ``matmul``: the op's own product z [N, D] @ bank^T [D, C Q] in PyTorch at the same precision,
    timed forward only, whose row's TFLOP/s is the same-shape, same-precision ceiling (the
    driver's ``pct_of_matmul`` is against a square matmul at the case's precision)."""
    n, d, c, q, mode, precision, with_matmul = shape
    if dtype != torch.float32 and precision != "ieee":
        return {}, {}  # the precision switch applies to fp32 only: nothing new to time
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, d, generator=g).to(device, dtype)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    bank = torch.nn.functional.normalize(torch.randn(c, q, d, generator=g), dim=2).to(device, dtype)
    positive = torch.randn(n, d, generator=g).to(device, dtype) if mode == "lc" else None
    flat = bank.reshape(c * q, d)
    providers = {
        "fused": lambda z_: ops.class_bank_contrast(z_, labels, bank, mode, positive=positive, impl="triton"),
        "reference": lambda z_: ops.class_bank_contrast(z_, labels, bank, mode, positive=positive,
                                                        impl="reference"),
    }
    if _with_compiled(device):
        # the reference formulation itself (the op keeps it opaque), in the op's compute dtype
        if mode == "hc":
            compiled = torch.compile(ref.class_bank_contrast_hc)
            providers["compiled"] = lambda z_: compiled(z_.float(), labels, bank.float())
        else:
            compiled = torch.compile(ref.class_bank_contrast_lc)
            providers["compiled"] = lambda z_: compiled(z_.float(), labels, positive.float(), bank.float())
    # the switch set around every timed closure, backward passes included (the reference's
    # autograd matmuls follow it when they run), and around the forward _loss_modes keeps
    modes = {name: {mode: class_bank_contrast_precision(closure, precision)
                    for mode, closure in _loss_modes(class_bank_contrast_precision(fn, precision), z).items()}
             for name, fn in providers.items()}
    if with_matmul:
        modes["matmul"] = {"fwd": class_bank_contrast_precision(lambda: z @ flat.T, precision)}
    gemm = 2 * n * c * q * d  # one anchors x bank product
    # FLOP floor: forward one product, backward one recompute plus the gradient product (the fused
    # HC adds ~2/C of a product per pass for its positives, uncounted)
    floors = {"fwd": ("flop", gemm, precision), "bwd": ("flop", 2 * gemm, precision),
              "fwd+bwd": ("flop", 3 * gemm, precision)}
    return modes, floors


def graph_mix_cases(smoke: bool):
    """MLLC's whole G2Net layer (both graphs and the 1x1 convs): (images, h, w, C, D, official mask)."""
    if smoke:
        return [("smoke", (2, 4, 5, 5, 16, False)), ("smoke_om", (2, 4, 5, 5, 16, True))]
    # per-image graphs at 1/8 of a 321 crop (VOC: 10 images x 41 x 41) and of 256 x 512 (City: 2 + 2
    # images x 33 x 65), VOC again with the official class-graph mask, and one batch-wide graph
    # (``--mllc-batch-graph``) of 16k and 64k nodes
    return [("voc", (10, 41, 41, 21, 256, False)), ("voc_om", (10, 41, 41, 21, 256, True)),
            ("city", (4, 33, 65, 19, 256, False)), ("batch16k", (1, 128, 128, 21, 256, False)),
            ("batch64k", (1, 256, 256, 21, 256, False))]


# N x N matrices the dense providers hold at once (official layer, fwd+bwd: similarity, sorted values,
# int64 indices as two, kept, A, diag_embed, a product, and A^ / Q^ saved for the backward)
_DENSE_NN = 12


def graph_mix_bench(shape, dtype, device):
    """Providers: fused (``ops.graph_propagate`` on the Triton kernels), reference (the same op on
    the eager references), compiled (``torch.compile`` of ``reference.graph_propagate``), official
    (``reference.official_dense_layer``: full sort, diag_embed products). The dense three are left
    out, with a printed reason, where their N x N matrices would not fit in the free device memory.
    Mode ``graph`` (fused only) times the top-k and degree passes alone: three similarity products
    of 2 N^2 D, so its TFLOP/s is the similarity tiles' rate (the per-row merge sort included).
    Other modes count the useful products per image and direction: the similarity (2 N^2 D), A^ Z
    (2 N^2 C), the class graph (official mask: Q and Q^ F, 2 N^2 (C + D); intended: its rank-C
    form, 4 N C^2 D) and the convs (4 N (C^2 + D^2))."""
    from semiseg_fast.kernels import graph as graph_kernels

    b, h, w, c, d, official = shape
    n = h * w
    k = min(21, n)
    g = torch.Generator(device="cpu").manual_seed(0)
    # one leaf holds every image's logits (first C columns) and embeddings, so the backward
    # modes time the gradients of both inputs
    zf = torch.cat([torch.randn(b, n, c, generator=g) * 2, torch.randn(b, n, d, generator=g)], 2).to(device, dtype)
    eta = torch.full((c,), 0.5, device=device, dtype=dtype)
    conv_z = torch.nn.Sequential(torch.nn.Conv2d(c, c, 1), torch.nn.Conv2d(c, c, 1)).to(device, dtype)
    conv_f = torch.nn.Sequential(torch.nn.Conv2d(d, d, 1), torch.nn.ReLU(), torch.nn.Conv2d(d, d, 1)).to(device, dtype)
    # every case compiles ref.graph_propagate afresh: its recompiles across cases, dtypes and grad
    # modes would pass dynamo's recompile limit and fall back to eager without saying so
    torch.compiler.reset()
    compiled = torch.compile(ref.graph_propagate)

    def layer_loss(layer, batched, **kw):
        # the ops take the batch of per-image graphs in one call (as MLLC runs them); the dense
        # providers are one-graph functions, called per image
        def loss(x):
            images = [x] if batched else [x[i] for i in range(b)]
            total = x.new_zeros((), dtype=torch.float32)
            for xi in images:
                z_out, f_out = layer(xi[..., :c], xi[..., c:], eta, conv_z, conv_f, k=k, official_layout=official,
                                     h=h, w=w, **kw)
                # the mean square of each image's outputs, summed over the images
                total = total + (z_out.float().square().mean((-2, -1)) + f_out.float().square().mean((-2, -1))).sum()
            return total
        return loss

    layers = {"fused": layer_loss(ops.graph_propagate, True, impl="triton"),
              "reference": layer_loss(ops.graph_propagate, True, impl="reference"),
              "compiled": layer_loss(compiled, False), "official": layer_loss(ref.official_dense_layer, False)}
    if not _with_compiled(device, everywhere=True):
        del layers["compiled"]
    skipped = {}
    if device.type == "cuda":
        need = _DENSE_NN * n * n * 4
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            reason = (f"skipped: about {need / 2**30:.0f} GiB of N x N matrices for {n} nodes, "
                      f"{free / 2**30:.0f} GiB free")
            skipped = {name: reason for name in layers if name != "fused"}
            layers = {"fused": layers["fused"]}
    if dtype == torch.float32:
        # the providers must agree before any is timed (roundings and, rarely, a neighbour at theta
        # decided the other way on one row move the mean square by far less than 1e-3); in bf16 the
        # dense ones sort and threshold bf16 similarities (ties), the ops compute in fp32
        with torch.no_grad():
            expected = layers["fused"](zf).double()
            for name, fn in layers.items():
                got = fn(zf).double()
                if not torch.allclose(got, expected, rtol=1e-3):
                    raise AssertionError(f"graph_mix provider {name}: {got.item()} != fused {expected.item()}")
    providers = {name: _loss_modes(fn, zf) for name, fn in layers.items()}

    def graph_passes():
        graph_kernels.semantic_graph(zf[:, :, c:], k)

    providers["fused"]["graph"] = graph_passes
    providers |= skipped  # the driver records a skipped provider's reason in its rows
    class_graph = 2 * n * n * (c + d) if official else 4 * n * c * c * d
    one_way = b * (2 * n * n * d + 2 * n * n * c + class_graph + 4 * n * (c * c + d * d))
    floors = {"fwd": ("flop", one_way), "bwd": ("flop", one_way), "fwd+bwd": ("flop", 2 * one_way),
              "graph": ("flop", b * 3 * 2 * n * n * d)}
    return providers, floors


OPS = {"spatial_kl": (spatial_kl_cases, spatial_kl_bench),
       "graph_mix": (graph_mix_cases, graph_mix_bench),
       "class_bank_contrast": (class_bank_contrast_cases, class_bank_contrast_bench),
       "entropy_percentile": (entropy_percentile_cases, entropy_percentile_bench),
       "sampled_contrast": (sampled_contrast_cases, sampled_contrast_bench)}


# -- driver ---------------------------------------------------------------------------------------

def _loss_modes(provider: Callable, q: torch.Tensor):
    """fwd, bwd (backward of a kept forward), fwd+bwd closures for a loss of q."""
    qg = q.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return provider(q)

    def fwd_bwd():
        loss = provider(qg)
        loss.backward()
        qg.grad = None

    def gradient():
        # untimed: profiling/tune.py compares the gradient of every kernel configuration
        return torch.autograd.grad(provider(qg), qg)[0]

    fwd_bwd.gradient = gradient
    loss_kept = provider(qg)

    def bwd():
        loss_kept.backward(retain_graph=True)
        qg.grad = None

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def run(op_names, dtype_names, smoke: bool, device: torch.device, out: Path | None, echo=print, *,
        first_case_only: bool = False, providers: set[str] | None = None) -> list[dict]:
    """Benchmark rows of ``op_names`` x their cases x ``dtype_names``; ``first_case_only`` keeps each
    op's first case (the method's default shape), ``providers`` a subset of the providers."""
    env = stamp(device)
    copy = copy_bandwidth(device)
    echo(f"device {env['device']}, copy bandwidth {copy:.0f} GB/s, torch {env['torch']}, triton {env['triton']}")
    rows, rates = [], {}
    for op in op_names:
        cases, build = OPS[op]
        for case, shape in cases(smoke)[:1] if first_case_only else cases(smoke):
            for dtype_name in dtype_names:
                built, floors = build(shape, DTYPES[dtype_name], device)
                for provider, modes in built.items():
                    if providers is not None and provider not in providers:
                        continue
                    if isinstance(modes, str):  # a provider this case cannot run: recorded with the reason
                        rows += [{**env, "op": op, "case": case, "dtype": dtype_name,
                                  "provider": provider, "mode": mode, "note": modes} for mode in floors]
                        echo(f"{op:<11} {case:<8} {dtype_name:<5} {provider:<9} {modes}")
                        continue
                    for mode, closure in modes.items():
                        with peak_memory(device) as measured:
                            med, p20, p80 = time_op(closure, device)
                        peak = measured.mb or 0.0
                        row = {**env, "op": op, "case": case, "dtype": dtype_name,
                               "provider": provider, "mode": mode, "ms_median": f"{med:.4f}", "ms_p20": f"{p20:.4f}",
                               "ms_p80": f"{p80:.4f}", "peak_mb": f"{peak:.1f}", "copy_gb_s": f"{copy:.4g}"}
                        floor = floors[mode]
                        if isinstance(floor, tuple):  # GEMM-bound: FLOPs against the matmul rate
                            # ("flop", count[, "tf32"]): fp32 rows compare with an IEEE matmul
                            # unless the case runs its products in TF32
                            key = (dtype_name, floor[2] if len(floor) > 2 else "ieee")
                            if key not in rates:
                                rates[key] = matmul_rate(device, DTYPES[dtype_name], tf32=key[1] == "tf32")
                            tflop_s = floor[1] / (med * 1e-3) / 1e12
                            row |= {"gflop": f"{floor[1] / 1e9:.4g}", "tflop_s": f"{tflop_s:.4g}",
                                    # significant digits: a loaded CPU runs the smoke matmul at < 0.05 TFLOP/s
                                    "matmul_tflop_s": f"{rates[key]:.4g}",
                                    "pct_of_matmul": f"{100 * tflop_s / rates[key]:.1f}"}
                            rate = f"{tflop_s:7.2f} TFLOP/s ({row['pct_of_matmul']}% of matmul)"
                        else:
                            gb_s = floor / (med * 1e-3) / 1e9
                            row |= {"floor_mb": f"{floor / 2**20:.1f}", "gb_s": f"{gb_s:.4g}",
                                    "pct_of_copy": f"{100 * gb_s / copy:.1f}"}
                            rate = f"{gb_s:7.1f} GB/s ({row['pct_of_copy']}% of copy)"
                        rows.append(row)
                        echo(f"{op:<11} {case:<8} {dtype_name:<5} {provider:<9} {mode:<8} {med:9.3f} ms "
                             f"[{p20:.3f}, {p80:.3f}]  {rate}  peak {peak:.0f} MB")
    if out is not None and rows:
        append_rows(out, rows)
        echo(f"appended {len(rows)} rows to {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.bench_ops", description=__doc__.split("\n")[0])
    parser.add_argument("--op", action="append", choices=sorted(OPS), help="op to run (repeatable; default all)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="input dtype (default fp32, bf16)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: the Triton interpreter)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = None if args.no_csv or args.smoke else results_path(device)
    run(args.op or sorted(OPS), args.dtype or ["fp32", "bf16"], args.smoke, device, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
