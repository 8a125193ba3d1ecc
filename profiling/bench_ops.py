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
and per op ``compiled`` (spatial KL: ``torch.compile(fullgraph=True)`` of a loop-free PyTorch
formulation, since the references read sizes on the host; providers are checked to agree first)
or ``official`` (entropy percentile: U2PL's device-to-host copy and ``numpy.percentile``). Modes:
``fwd``, ``bwd``, ``fwd+bwd`` for losses, ``fwd`` for statistics.

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
import csv
import datetime
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from semiseg_fast import ops
from semiseg_fast import reference as ref

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = ["date", "commit", "device", "torch", "triton", "op", "case", "dtype", "provider", "mode",
          "ms_median", "ms_p20", "ms_p80", "peak_mb", "floor_mb", "gb_s", "copy_gb_s", "pct_of_copy",
          "gflop", "tflop_s", "matmul_tflop_s", "pct_of_matmul"]


def _timer(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return med, p20, p80
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return statistics.median(times), times[1], times[-2]


def copy_bandwidth(device: torch.device, mb: int = 1024) -> float:
    """GB/s of a device-to-device copy (read + write counted), the practical ceiling."""
    if device.type != "cuda":
        mb = 64
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    med, _, _ = _timer(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (med * 1e-3) / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a square matmul at ``dtype`` (fp32 at IEEE precision, as the fused GEMM kernels
    use), the ceiling the GEMM-bound ops are compared with."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        med, _, _ = _timer(lambda: a @ b, device)
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
    compiled = torch.compile(spatial_kl_vectorized, fullgraph=True)
    providers = {
        "fused": lambda q_: ops.spatial_kl(p, q_, ignore=ignore, impl="triton"),
        "reference": lambda q_: ref.spatial_kl(p, q_, ignore=ignore),
        "compiled": lambda q_: compiled(p, q_, ignore),
    }
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
    if smoke:
        return [("smoke", (2, 5, 17, 19))]
    return [("voc513", (4, 21, 513, 513)), ("city769", (2, 19, 769, 769)), ("stress64M", (1, 1, 8192, 8192))]


def entropy_percentile_bench(shape, dtype, device):
    """Entropy + U2PL's three thresholds; the 1-class stress case times the selection alone
    (its entropy is 0 everywhere, so it runs on the logits as values via ``percentile``)."""
    b, c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    valid = (torch.rand(b, h, w, generator=g) < 0.9).to(device)
    if c == 1:
        values, mask = logits.reshape(b, h, w), valid

        def official():
            import numpy as np

            sel = values[mask].float().cpu().numpy()
            return [np.percentile(sel, q) for q in U2PL_Q]

        providers = {
            "fused": lambda: ops.percentile(values, U2PL_Q, mask, impl="triton"),
            "reference": lambda: ops.percentile(values, U2PL_Q, mask, impl="reference"),
            "official": official,
        }
        floor = values.numel() * values.element_size()
    else:
        def official():
            import numpy as np

            ent = ref.entropy(logits.float())
            sel = ent[valid].cpu().numpy()
            return ent, [np.percentile(sel, q) for q in U2PL_Q]

        providers = {
            "fused": lambda: ops.entropy_percentile(logits, U2PL_Q, valid, impl="triton"),
            "reference": lambda: ops.entropy_percentile(logits, U2PL_Q, valid, impl="reference"),
            "official": official,
        }
        floor = logits.numel() * logits.element_size()
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
    # gather-bound: every sampled anchor, prototype and negative row read once (the floor of a
    # gather; the forward and the backward each need them), the anchor gradient written once
    gathered = k * m * (nneg + 2) * d * anchors.element_size()
    floors = {"fwd": gathered, "bwd": gathered + anchors.numel() * anchors.element_size(),
              "fwd+bwd": gathered + anchors.numel() * anchors.element_size()}
    return {name: _loss_modes(fn, anchors) for name, fn in providers.items()}, floors


def class_bank_contrast_cases(smoke: bool):
    if smoke:
        return [("smoke_hc", (40, 16, 3, 8, "hc"))]
    # CTT VOC: 10 + 10 images at 41 x 41 = 33,620 anchors; City: 2 + 2 at 33 x 65 = 8,580
    return [("voc_hc", (33620, 256, 21, 256, "hc")), ("voc_lc", (33620, 256, 21, 512, "lc")),
            ("city_hc", (8580, 256, 19, 256, "hc"))]


def class_bank_contrast_bench(shape, dtype, device):
    n, d, c, q, mode = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, d, generator=g).to(device, dtype)
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    bank = torch.nn.functional.normalize(torch.randn(c, q, d, generator=g), dim=2).to(device, dtype)
    positive = torch.randn(n, d, generator=g).to(device, dtype) if mode == "lc" else None
    providers = {
        "fused": lambda z_: ops.class_bank_contrast(z_, labels, bank, mode, positive=positive, impl="triton"),
        "reference": lambda z_: ops.class_bank_contrast(z_, labels, bank, mode, positive=positive,
                                                        impl="reference"),
    }
    gemm = 2 * n * c * q * d  # one anchors x bank product
    # FLOP floor: forward one product, backward one recompute plus the gradient product
    floors = {"fwd": ("flop", gemm), "bwd": ("flop", 2 * gemm), "fwd+bwd": ("flop", 3 * gemm)}
    return {name: _loss_modes(fn, z) for name, fn in providers.items()}, floors


def graph_mix_cases(smoke: bool):
    if smoke:
        return [("smoke", (40, 5, 16))]
    # MLLC: one image's graph at 1/8 of a 321 crop (VOC, 41 x 41) and of 256 x 512 (City, 33 x 65)
    return [("voc", (1681, 21, 256)), ("city", (2145, 19, 256))]


def graph_mix_bench(shape, dtype, device):
    n, c, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, c, generator=g).to(device, dtype)
    f = torch.randn(n, d, generator=g).to(device, dtype)
    eta = torch.full((c,), 0.5, device=device, dtype=dtype)
    providers = {
        "fused": lambda z_: ops.graph_mix(z_, f, eta, k=21, impl="triton")[0].float().square().mean(),
        "reference": lambda z_: ops.graph_mix(z_, f, eta, k=21, impl="reference")[0].float().square().mean(),
    }
    sim = 2 * n * n * d  # one similarity product; the fused forward computes it 5 times (top-k,
    # degree and apply passes, the last two with the transposed tile)
    floors = {"fwd": ("flop", sim + 2 * n * n * c), "bwd": ("flop", sim + 2 * n * n * c),
              "fwd+bwd": ("flop", 2 * (sim + 2 * n * n * c))}
    return {name: _loss_modes(fn, z) for name, fn in providers.items()}, floors


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

    loss_kept = provider(qg)

    def bwd():
        loss_kept.backward(retain_graph=True)
        qg.grad = None

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def _environment() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
            "triton": triton_version}


def run(op_names, dtype_names, smoke: bool, device: torch.device, out: Path | None, echo=print) -> list[dict]:
    env = _environment()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy = copy_bandwidth(device)
    echo(f"device {device_name}, copy bandwidth {copy:.0f} GB/s, torch {env['torch']}, triton {env['triton']}")
    rows, rates = [], {}
    for op in op_names:
        cases, build = OPS[op]
        for case, shape in cases(smoke):
            for dtype_name in dtype_names:
                providers, floors = build(shape, DTYPES[dtype_name], device)
                for provider, modes in providers.items():
                    for mode, closure in modes.items():
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats(device)
                            base = torch.cuda.memory_allocated(device)
                        med, p20, p80 = _timer(closure, device)
                        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else 0.0
                        row = {**env, "device": device_name, "op": op, "case": case, "dtype": dtype_name,
                               "provider": provider, "mode": mode, "ms_median": f"{med:.4f}", "ms_p20": f"{p20:.4f}",
                               "ms_p80": f"{p80:.4f}", "peak_mb": f"{peak:.1f}", "copy_gb_s": f"{copy:.4g}"}
                        floor = floors[mode]
                        if isinstance(floor, tuple):  # GEMM-bound: FLOPs against the matmul rate
                            if dtype_name not in rates:
                                rates[dtype_name] = matmul_rate(device, DTYPES[dtype_name])
                            tflop_s = floor[1] / (med * 1e-3) / 1e12
                            row |= {"gflop": f"{floor[1] / 1e9:.4g}", "tflop_s": f"{tflop_s:.4g}",
                                    # significant digits: a loaded CPU runs the smoke matmul at < 0.05 TFLOP/s
                                    "matmul_tflop_s": f"{rates[dtype_name]:.4g}",
                                    "pct_of_matmul": f"{100 * tflop_s / rates[dtype_name]:.1f}"}
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
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = None if args.no_csv or args.smoke else RESULTS / f"{name.replace(' ', '_')}.csv"
    run(args.op or sorted(OPS), args.dtype or ["fp32", "bf16"], args.smoke, device, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
