"""The whole benchmark suite in one command: ceilings, every op, the U2PL stage, every method's step.

    python -m profiling.run_all                  # on a GPU: realistic sizes, rows appended to
                                                 # profiling/results/<device>.csv, plots, tables printed
    python -m profiling.run_all --readme README.md   # ... and the README's results block regenerated
    python -m profiling.run_all --smoke --out /tmp/cpu.csv   # tiny sizes on any device (CPU: interpreter)

In one process, in this order (each part is also its own command):

1. ceilings: device copy bandwidth and square-matmul rates (fp32 IEEE, fp32 TF32, bf16);
2. ``profiling.bench_ops``: every op, providers fused / eager reference / compiled reference or the
   official path, fwd, bwd and fwd+bwd, fp32 and bf16;
3. ``profiling.bench_u2pl_stage``: U2PL's whole contrastive stage against an official-style CPU bank;
4. ``profiling.bench_steps``: every method's training step with the fused ops and with the
   references (ms/step, images/s, peak memory, host syncs, graph breaks);
5. ``profiling.report``: the tables and the issue targets, PNG plots next to the CSV (matplotlib),
   and with ``--readme`` the README's results block.

Sizes: the spec's realistic shapes for the ops; the steps at a 321 crop, 4 + 4 images, ResNet-101,
eager by default (``--compile-steps`` compiles them, which costs a compilation per method and
provider; graph breaks are counted either way).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import bench_ops, bench_steps, bench_u2pl_stage, report
from .harness import append_rows, results_path, stamp


def ceiling_rows(device: torch.device, smoke: bool) -> list[dict]:
    env = stamp(device)
    base = {"op": "ceiling", "provider": "torch", "mode": "fwd"}
    copy = bench_ops.copy_bandwidth(device)
    rows = [env | base | {"case": "copy bandwidth (read + write)", "dtype": "fp32", "gb_s": f"{copy:.4g}"}]
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        rate = bench_ops.matmul_rate(device, dtype, tf32=tf32)
        rows.append(env | base | {"case": f"matmul {name}", "dtype": name, "tflop_s": f"{rate:.4g}"})
    return rows


def run(device: torch.device, out: Path | None, *, smoke: bool, readme: Path | None, plots: bool,
        compile_steps: bool, methods: list[str] | None = None, op_names: list[str] | None = None,
        echo=print) -> list[dict]:
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        echo(f"\n== {name} ({time.perf_counter() - t0:.0f} s in)")

    stage("ceilings")
    rows = ceiling_rows(device, smoke)
    for r in rows:
        echo(f"{r['case']:<32} {r.get('gb_s') or r.get('tflop_s')} {'GB/s' if r.get('gb_s') else 'TFLOP/s'}")
    if out is not None:
        append_rows(out, rows)

    stage("ops")
    dtypes = ["fp32"] if smoke else ["fp32", "bf16"]  # the smoke checks the plumbing, once
    rows += bench_ops.run(op_names or sorted(bench_ops.OPS), dtypes, smoke, device, out, echo=echo)

    stage("U2PL contrastive stage")
    rows += bench_u2pl_stage.run("smoke" if smoke else "voc", device, 10 if smoke else 50, out, echo=echo)

    stage("training steps")
    size = bench_steps.SMOKE_SIZE if smoke else bench_steps.GPU_SIZE
    methods = methods or list(bench_steps.METHODS)
    steps, warmup = (2, 1) if smoke else (10, 3)
    rows += bench_steps.run(methods, size, device, out, steps=steps, warmup=warmup,
                            compile_mode="on" if compile_steps else "off", smoke=smoke, echo=echo)

    stage("report")
    shown = report.load(out) if out is not None else rows
    written = report.render_plots(shown, out.with_suffix("")) if plots and out is not None else []
    if plots and out is not None and not written:
        echo("matplotlib is not installed: no plots (pip install -e \".[bench]\")")
    text = report.markdown(shown, written, relative_to=readme.resolve().parent if readme else None)
    echo(text)
    if readme is not None:
        report.update_readme(readme, text)
        echo(f"updated the results block of {readme}")
    echo(f"suite done in {time.perf_counter() - t0:.0f} s" + (f"; rows in {out}" if out else ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.run_all", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: the Triton interpreter)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="results CSV (default profiling/results/<device>.csv; "
                                                  "a smoke run writes only where --out says)")
    parser.add_argument("--readme", type=Path, help="regenerate the results block of this Markdown file")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--compile-steps", action="store_true", help="time the steps under torch.compile")
    parser.add_argument("--method", action="append", choices=sorted(bench_steps.METHODS),
                        help="methods whose steps are timed (repeatable; default all)")
    parser.add_argument("--op", action="append", choices=sorted(bench_ops.OPS),
                        help="ops to benchmark (repeatable; default all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = args.out if args.out is not None or args.smoke else results_path(device)
    run(device, out, smoke=args.smoke, readme=args.readme, plots=not args.no_plots,
        compile_steps=args.compile_steps, methods=args.method, op_names=args.op)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
