"""Ahead-of-time compile of every kernel configuration the ops launch, for GPUs that need not be here.

    python -m profiling.aot                         # full sweep, sm_90 and sm_80, writes the two CSVs
    python -m profiling.aot --subset ci --out DIR   # what each method's defaults launch at VOC size
    python -m profiling.aot --targets sm90 --kernel _bank_kernel

The Triton interpreter accepts code that the compiler rejects and never allocates registers or
shared memory, so the CPU tests alone cannot say whether a kernel builds for a GPU. This module
runs the public ops (``impl="triton"``) at the shapes of each method's defaults (321 x 321 VOC
and 801 x 801 Cityscapes crops) on CPU tensors with every kernel replaced by a recorder: the ops
validate, pick their tiles and compute their launch arguments exactly as they do on a GPU, and each
launch is captured instead of run. Every distinct launch (kernel, argument types with Triton's
own integer and alignment specialisation, constexprs, warps, stages) is then compiled with
``triton.compile`` for ``GPUTarget("cuda", 90 | 80, 32)``; ptxas's ``-v`` log (which Triton prints
when ``knobs.nvidia.dump_ptxas_log`` is set) gives registers, spill stores and the stack frame,
the compiled kernel's ``metadata.shared`` its shared memory, and the PTX its vector loads and
tensor-core instructions.

Rows go to ``profiling/results/aot_sm90.csv`` and ``aot_sm80.csv`` (``--out`` elsewhere), one
per compiled configuration, with the cases that launch it. ``SPILL_BUDGET`` states, once per
kernel, the spill stores it may have; ``tests/test_aot.py`` compiles the ``ci`` subset and holds
every row to it and to the target's shared-memory limit.

Must run without ``TRITON_INTERPRET=1`` (the kernels are then interpreter objects, not
compilable); it needs Triton's NVIDIA backend (ptxas ships in the Linux wheel), no GPU, no CUDA
torch. Compiles run in worker processes (``--jobs``) with ``TRITON_ALWAYS_COMPILE`` and a private
Triton cache, so ptxas always runs and prints its log.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import io
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# before triton is imported anywhere in this process: real JIT functions, not interpreter objects,
# and a cache of our own so every compile runs ptxas (a cached kernel prints no log)
# (profiling/__init__.py chooses the interpreter on CPU-only machines; nothing here can use it)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("profiling.aot: triton was imported with TRITON_INTERPRET=1; run it in a fresh process")
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="semiseg-aot-"))
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; set so Triton >= 3.9 does not warn

import torch  # noqa: E402

# the harness imports no triton: the environment set above still decides how it loads
from .harness import RESULTS, read_rows, stamp, write_rows

KERNEL_MODULES = ("spatial_kl", "entropy_percentile", "contrast", "graph")
TARGETS = {"sm90": 90, "sm80": 80}
# the most dynamic shared memory one block may take (CUDA programming guide, compute capabilities)
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Spill stores (bytes per thread) a kernel may have, stated once per kernel: zero for all of them,
# forward hot loops and backward passes alike, under Triton 3.6 (the GPU image's) and 3.9.
SPILL_BUDGET = {
    "_kl_partials_kernel": 0, "_kl_grad_kernel": 0,
    "_entropy_kernel": 0, "_teacher_stats_kernel": 0, "_radix_hist_kernel": 0, "_rank_mask_kernel": 0,
    "_sampled_kernel": 0, "_bank_kernel": 0,
    "_topk_kernel": 0, "_degree_kernel": 0, "_apply_kernel": 0,
}


FIELDS = ["kernel", "config", "dtype", "num_warps", "num_stages", "registers", "spill_bytes", "spill_loads",
          "stack_bytes", "shared_bytes", "shared_limit", "vector_loads", "scalar_loads", "mma", "mma_kinds",
          "compiled_ok",
          "spill_budget", "within_budget", "error", "cases", "target", "triton", "torch", "commit", "date"]


# -- recording launches --------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    module: str  # the kernel's module, e.g. "semiseg_fast.kernels.graph"
    kernel: str
    signature: dict  # argument name -> Triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: dict  # name -> value
    divisible: tuple  # argument indices with Triton's 16-divisibility specialisation
    num_warps: int
    num_stages: int

    def key(self) -> tuple:
        return (self.module, self.kernel, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                self.divisible, self.num_warps, self.num_stages)


_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                    torch.uint8: "u8", torch.bool: "u1"}
# launch options the JIT takes as keywords (not kernel arguments)
_LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 3}


def specialise(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, tuple]:
    """Triton's specialisation of one launch, written out so it does not depend on JIT internals
    that move between versions: tensors -> pointers (16-byte-aligned ones marked divisible), an
    integer equal to 1 -> the constexpr 1, integers divisible by 16 marked divisible, floats ->
    fp32, None -> a constexpr. Returns (signature, constexprs, divisible argument indices)."""
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    params = {p.name: p for p in fn.params}
    signature, constexprs, divisible = {}, {}, []
    for i, (name, value) in enumerate(bound.arguments.items()):
        param = params[name]
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            if value.data_ptr() % 16 == 0:
                divisible.append(i)
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else ("i64" if value < 2**63 else "u64")
            if value % 16 == 0 and not param.do_not_specialize:
                divisible.append(i)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"profiling.aot: argument {name} of {fn.__name__} has type {type(value).__name__}")
    return signature, constexprs, tuple(divisible)


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the launch, runs nothing."""

    def __init__(self, fn, module: str, sink: list):
        self.fn, self.module, self.sink = fn, module, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k, v) for k, v in _LAUNCH_OPTIONS.items()}
            sig, const, div = specialise(self.fn, args, kwargs)
            self.sink.append(Launch(self.module, self.fn.__name__, sig, const, div, options["num_warps"],
                                    options["num_stages"]))
        return launch


def _kernel_module(name: str):
    return importlib.import_module(f"semiseg_fast.kernels.{name}" if name in KERNEL_MODULES else name)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Replace every launched kernel (module globals ``_*_kernel``) by a recorder for the block."""
    from triton.runtime.jit import JITFunction

    sink: list[Launch] = []
    swapped = []
    for name in KERNEL_MODULES:
        module = _kernel_module(name)
        for attr, value in vars(module).copy().items():
            if attr.endswith("_kernel") and isinstance(value, JITFunction):
                setattr(module, attr, _Recorder(value, module.__name__, sink))
                swapped.append((module, attr, value))
    try:
        yield sink
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


# -- the cases: each method's defaults at real sizes ---------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Case:
    name: str  # "<method>/<data>/<what>"
    dtype: str
    run: Callable[[], None]
    ci: bool = False  # part of the test's subset


def _grad(out: torch.Tensor, inputs) -> None:
    torch.autograd.grad(out.float().sum(), inputs, allow_unused=True)


def _spatial_kl(b, c, size, dtype):
    from semiseg_fast import ops

    def run():
        p = torch.randn(b, c, size, size, dtype=dtype)
        q = torch.randn(b, c, size, size, dtype=dtype, requires_grad=True)
        ignore = torch.zeros(b, size, size, dtype=torch.bool)
        _grad(ops.spatial_kl(p, q, ignore=ignore, impl="triton"), q)
        _grad(ops.spatial_kl(p, q, impl="triton"), q)
    return run


def _u2pl_teacher(b, c, crop, dtype):
    from semiseg_fast import ops

    grid = (crop + 3) // 4  # DeepLabV3+ logits at 1/4

    def run():
        logits = torch.randn(2 * b, c, grid, grid, dtype=dtype)
        ops.teacher_stats(logits[b:], (crop, crop), entropy=False, max_prob=False, impl="triton")
        stats = ops.teacher_stats(logits, (crop, crop), first_image=b, max_prob=False, argmax=False, prob=True,
                                  rank=True, low_rank=3, high_rank=20, impl="triton")
        valid = torch.ones(b, crop, crop, dtype=torch.bool)
        ops.percentile(stats.entropy, [80.0, 20.0, 80.0], valid, impl="triton")
        ops.percentile(stats.entropy, [80.0], impl="triton")
        ops.entropy_percentile(logits, [50.0], impl="triton")
        ops.rank_mask(stats.prob, 3, 20, impl="triton")
    return run


def _u2pl_contrast(n, d, c, rows, dtype):
    from semiseg_fast import ops

    def run():
        anchors = torch.randn(n, d, dtype=dtype, requires_grad=True)
        proto = torch.randn(c, d, dtype=dtype)
        bank = torch.randn(rows, d, dtype=dtype)
        aidx = torch.randint(0, n, (c, 256))
        nidx = torch.randint(0, rows, (c, 256, 50))
        _grad(ops.sampled_contrast(anchors, proto, bank, aidx, nidx, 0.5, impl="triton"), anchors)
    return run


def _ctt_contrast(n, d, c, q, dtype, precision):
    from semiseg_fast import ops

    def run():
        z = torch.randn(n, d, dtype=dtype, requires_grad=True)
        labels = torch.randint(-1, c, (n,))
        bank = torch.randn(c, q, d, dtype=dtype)
        _grad(ops.class_bank_contrast(z, labels, bank, "hc", temperature=0.1, precision=precision,
                                      impl="triton"), z)
        both = torch.randn(c, 2 * q, d, dtype=dtype)
        pos = torch.randn(n, d, dtype=dtype, requires_grad=True)
        _grad(ops.class_bank_contrast(z, labels, both, "lc", positive=pos, temperature=0.5, precision=precision,
                                      impl="triton"), z)
        _grad(ops.class_bank_contrast(z, labels, both, "lc", positive=pos, temperature=0.5, precision=precision,
                                      detach_positive=False, impl="triton"), (z, pos))
    return run


def _mllc_graph(b, h, w, c, d, k, official, dtype):
    from semiseg_fast import ops

    def run():
        n = h * w
        z = torch.randn(b, n, c, dtype=dtype, requires_grad=True)
        f = torch.randn(b, n, d, dtype=dtype, requires_grad=True)
        eta = torch.full((c,), 0.9)
        z_mix, y, _ = ops.graph_mix(z, f, eta, k=k, impl="triton")
        _grad(z_mix, (z, f))
        if official:
            logits = torch.randn(b, n, c, dtype=dtype)
            out = ops.class_propagate(logits, y, f, True, h, w, impl="triton")
            _grad(out, f)
    return run


def cases() -> list[Case]:
    out: list[Case] = []
    for data, c, crop, batch in (("voc", 21, 321, 2), ("city", 19, 801, 2)):
        voc = data == "voc"
        g8 = (crop + 7) // 8  # DeepLabV2 / ResNet OS-8 features
        for dt in DTYPES:
            dtype = DTYPES[dt]
            out.append(Case(f"ipixmatch/{data}/spatial_kl", dt, _spatial_kl(batch, c, crop, dtype), ci=voc and dt == "fp32"))
            out.append(Case(f"u2pl/{data}/teacher_stats+percentile", dt, _u2pl_teacher(batch, c, crop, dtype),
                            ci=voc and dt != "fp16"))
            g4 = (crop + 3) // 4
            out.append(Case(f"u2pl/{data}/sampled_contrast", dt,
                            _u2pl_contrast(2 * batch * g4 * g4, 256, c, 50000 + (c - 1) * 30000, dtype),
                            ci=voc and dt == "fp32"))
            precisions = ("ieee", "tf32") if dt == "fp32" else ("auto",)
            for precision in precisions:
                out.append(Case(f"ctt/{data}/class_bank_contrast/{precision}", dt,
                                _ctt_contrast(2 * batch * g8 * g8, 256, c, 256, dtype, precision),
                                ci=voc and dt in ("fp32", "bf16") and precision != "ieee"))
            out.append(Case(f"mllc/{data}/graph", dt, _mllc_graph(batch if voc else 2, g8, g8, c, 256, 21, voc, dtype),
                            ci=voc and dt == "fp32"))
    # crops whose pixel counts are multiples of 16 (512 x 512, its 128 x 128 logits): Triton's
    # divisibility specialisation then allows vector loads along the pixel axis
    out.append(Case("ipixmatch/crop512/spatial_kl", "fp32", _spatial_kl(2, 21, 512, torch.float32)))
    out.append(Case("u2pl/crop512/teacher_stats+percentile", "fp32", _u2pl_teacher(2, 21, 512, torch.float32)))
    # the 64-wide top-k buffer (32 < k <= 64) and the batch-wide graph (--mllc-batch-graph)
    out.append(Case("mllc/voc/graph/k=33", "fp32", _mllc_graph(2, 41, 41, 21, 256, 33, False, torch.float32), ci=True))
    out.append(Case("mllc/voc/graph/k=64", "fp32", _mllc_graph(2, 41, 41, 21, 256, 64, False, torch.float32)))
    out.append(Case("mllc/batch64k/graph", "fp32", _mllc_graph(1, 256, 256, 21, 256, 21, False, torch.float32)))
    return out


def record(selected: list[Case], echo=print) -> dict[tuple, tuple[Launch, list[str], str]]:
    """Run the cases under the recorder: distinct launch -> (launch, case names, dtype)."""
    from semiseg_fast import ops  # noqa: F401  (registers the kernels)

    launches: dict[tuple, tuple[Launch, list[str], str]] = {}
    for case in selected:
        with recording() as sink:
            case.run()
        for launch in sink:
            entry = launches.setdefault(launch.key(), (launch, [], case.dtype))
            label = f"{case.name}/{case.dtype}"
            if label not in entry[1]:
                entry[1].append(label)
        echo(f"  recorded {case.name} {case.dtype}: {len(sink)} launches")
    return launches


# -- compiling -----------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptx_counts(ptx: str) -> dict[str, int]:
    """Vector and scalar global loads and tensor-core instructions in the PTX text."""
    vector = len(re.findall(r"\bld\.global[.\w:]*?\.v[248]\.", ptx))
    loads = len(re.findall(r"\bld\.global\.", ptx))
    mma = re.findall(r"\b((?:wgmma\.mma_async|mma)\.sync\.aligned\.m\d+n\d+k\d+[.\w]*)", ptx)
    return {"vector_loads": vector, "scalar_loads": loads - vector, "mma": len(mma),
            "mma_kinds": " ".join(sorted(set(mma)))}


def compile_one(launch: Launch, capability: int) -> dict:
    """Compile one launch for sm_<capability>; registers, spills, shared memory and PTX counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        from triton import knobs
        knobs.nvidia.dump_ptxas_log = True
    except (ImportError, AttributeError):
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    fn = getattr(_kernel_module(launch.module), launch.kernel)
    attrs = {(i,): [["tt.divisibility", 16]] for i in launch.divisible}
    src = ASTSource(fn, dict(launch.signature), dict(launch.constexprs), attrs)
    log = io.StringIO()
    row = {"compiled_ok": False, "error": ""}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # a kernel that does not compile is a row, not a crash of the sweep
        # a CompilationError's text ends with the source and a caret; its message is the cause's
        inner = exc
        while inner.__cause__ is not None:
            inner = inner.__cause__
        message = str(getattr(inner, "error_message", None) or inner)
        first = next((ln.strip() for ln in message.splitlines() if ln.strip() and ln.strip() != "^"), "")
        row["error"] = f"{type(exc).__name__}: {first}"[:300]
        return row
    text = log.getvalue()
    regs = _REGS.search(text)
    spill = _SPILL.search(text)
    row.update(compiled_ok=True, shared_bytes=int(compiled.metadata.shared),
               registers=int(regs.group(1)) if regs else "",
               stack_bytes=int(spill.group(1)) if spill else "",
               spill_bytes=int(spill.group(2)) if spill else "",
               spill_loads=int(spill.group(3)) if spill else "", **ptx_counts(compiled.asm["ptx"]))
    if not regs:
        row["error"] = "no ptxas log (register counts unknown)"
    return row


def _config(launch: Launch) -> str:
    const = " ".join(f"{k}={v}" for k, v in launch.constexprs.items() if k.isupper())
    div = [name for i, name in enumerate(launch.signature) if i in launch.divisible
           and not launch.signature[name].startswith("*")]
    return const + (f" div16={','.join(div)}" if div else "")


def _job(args):
    launch, capability = args
    return compile_one(launch, capability)


def sweep(selected: list[Case], targets: list[str], kernels: set[str] | None = None, jobs: int = 1,
          echo=print) -> dict[str, list[dict]]:
    """Record the cases, compile every distinct launch for every target: target -> rows."""
    t0 = time.perf_counter()
    launches = record(selected, echo)
    todo = [(launch, names, dtype) for launch, names, dtype in launches.values()
            if kernels is None or launch.kernel in kernels]
    echo(f"{len(todo)} distinct launches in {time.perf_counter() - t0:.0f} s; compiling for {', '.join(targets)}")
    env = stamp()
    work = [(launch, TARGETS[t]) for t in targets for launch, _, _ in todo]
    cases_of = {id(launch): (names, dtype) for launch, names, dtype in todo}
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_job, work))
    else:
        results = [_job(w) for w in work]
    out: dict[str, list[dict]] = {t: [] for t in targets}
    for (launch, capability), result in zip(work, results):
        target = next(t for t, cap in TARGETS.items() if cap == capability)
        names, dtype = cases_of[id(launch)]
        budget = SPILL_BUDGET[launch.kernel]
        ok = result["compiled_ok"]
        row = {"kernel": launch.kernel, "config": _config(launch), "dtype": dtype, "num_warps": launch.num_warps,
               "num_stages": launch.num_stages, "shared_limit": SHARED_LIMIT[capability],
               "cases": "; ".join(names), "target": f"sm_{capability}", "spill_budget": budget, **env, **result}
        row["within_budget"] = (ok and row.get("spill_bytes", "") != "" and int(row["spill_bytes"]) <= budget
                                and int(row["shared_bytes"]) <= SHARED_LIMIT[capability])
        out[target].append(row)
        echo(f"  sm_{capability} {launch.kernel:22s} {row['config'][:60]:60s} "
             + (f"regs {row['registers']} spill {row['spill_bytes']} smem {row['shared_bytes']}" if ok
                else f"FAILED {row['error'][:80]}"))
    echo(f"done in {time.perf_counter() - t0:.0f} s")
    return out


def write(rows: list[dict], path: Path) -> None:
    """Write ``rows`` to ``path`` (atomically). Rows already there for another Triton version or
    another kernel are kept: one table holds the GPU image's Triton and this machine's side by
    side, and a ``--kernel`` run replaces only that kernel's rows."""
    replaced = {(r["triton"], r["kernel"]) for r in rows}
    if path.exists():
        rows = [r for r in read_rows(path) if (r.get("triton"), r.get("kernel")) not in replaced] + rows
    write_rows(path, FIELDS, sorted(rows, key=lambda r: (r["kernel"], r["config"], r["dtype"], r["triton"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="sm90,sm80", help="comma-separated: sm90, sm80 (default both)")
    parser.add_argument("--subset", choices=("all", "ci"), default="all",
                        help="all: every case (default); ci: each method's defaults at VOC size (the test's set)")
    parser.add_argument("--kernel", action="append", help="only this kernel (repeatable), e.g. _bank_kernel")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for aot_<target>.csv (default {RESULTS})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        parser.error(f"--targets: expected a list of {', '.join(TARGETS)}, got {args.targets!r}")
    if args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as exc:
        print(f"profiling.aot: Triton's NVIDIA backend is missing ({exc}); nothing can be compiled", file=sys.stderr)
        return 1
    selected = [c for c in cases() if args.subset == "all" or c.ci]
    rows = sweep(selected, targets, set(args.kernel) if args.kernel else None, args.jobs)
    failed = 0
    for target, target_rows in rows.items():
        path = args.out / f"aot_{target}.csv"
        write(target_rows, path)
        bad_rows = [r for r in target_rows if not r["within_budget"]]
        failed += len(bad_rows)
        print(f"{path}: {len(target_rows)} rows, {len(bad_rows)} failing (not compiled, over the shared-memory "
              f"limit or the spill budget)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
