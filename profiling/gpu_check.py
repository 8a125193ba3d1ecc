"""One command for a lent GPU: the GPU tests, each op against its eager reference, two method steps.

    python -m profiling.gpu_check --out DIR [--budget 480]
    python -m profiling.gpu_check --dry-run --out DIR      # the same plan on CPU at toy sizes (CI)

A lent H100 comes with minutes, not hours, so the plan is fixed, ordered by what it tells first,
and held to ``--budget`` seconds including Triton's compilation:

1. ``tests``: ``pytest -m gpu`` (every kernel against its float64 reference at real sizes, bf16 and
   fp32, forward and backward; host-sync checks) in a subprocess with JUnit XML, killed at its
   share of the budget;
2. ``ops/<op>``: ``bench_ops`` for each op at its first case (the method's default shape), fp32
   and bf16, providers ``fused`` and ``reference`` (eager): medians, GB/s or TFLOP/s against the
   copy and matmul rates measured in the same run;
3. ``steps/u2pl``, ``steps/unimatch``: ``bench_steps``, fused against reference ops.

Each stage runs under its own time limit (a subprocess timeout, an alarm in this process); a stage
that fails or runs out of time is recorded with its error and the plan goes on. Nothing is
installed, nothing is fetched: it needs the checkout (``PYTHONPATH=.``) and the image's torch and
Triton. Writes to DIR: ``gpu_check.csv`` (one row per stage: status, seconds, detail),
``bench.csv`` (bench_ops columns), ``tests.xml`` and ``report.md``. Exit status 0 when every stage
passed.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import bench_ops, bench_steps
from .harness import stamp, write_rows

ROOT = Path(__file__).resolve().parents[1]
STEP_METHODS = ("u2pl", "unimatch")
# shares of the budget: the tests first (they say whether anything else is worth reading)
SHARES = {"tests": 0.40, "ops": 0.35, "steps": 0.25}
STAGE_FIELDS = ["stage", "status", "seconds", "limit_s", "detail"]
# gpu_check.csv: the stage columns, then the stamp in this order
STAMP_FIELDS = ["device", "torch", "triton", "commit", "date"]


class StageTimeout(Exception):
    pass


@dataclasses.dataclass
class Stage:
    name: str
    limit_s: float
    run: Callable[[float], str]  # limit -> one-line detail; raises on failure


_expired: list[str] = []  # set by the alarm: Triton's interpreter re-raises what a kernel hit as its own error


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in this (main) thread after ``seconds``."""
    def expire(signum, frame):
        _expired.append(f"ran past its {seconds:.0f} s limit")
        raise StageTimeout(_expired[-1])

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _tests_stage(out: Path, dry_run: bool) -> Callable[[float], str]:
    def run(limit: float) -> str:
        xml = out / "tests.xml"
        env = {k: v for k, v in os.environ.items()}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}",
               str(ROOT / "tests")]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as exc:
            (out / "tests.log").write_text((exc.stdout or b"").decode(errors="replace")
                                          if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
            raise StageTimeout(f"pytest ran past its {limit:.0f} s limit (partial log in tests.log)") from exc
        (out / "tests.log").write_text(proc.stdout + proc.stderr)
        counts = _junit_counts(xml)
        detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"
        failed = [f"{case}: {msg}" for case, msg in _junit_failures(xml)][:5]
        if proc.returncode not in (0, 5):  # 5: nothing collected
            raise RuntimeError(f"{detail}; " + "; ".join(failed) if failed else f"pytest exited {proc.returncode}")
        if not dry_run and counts["passed"] == 0:
            raise RuntimeError(f"no GPU test ran ({detail}): is CUDA visible to torch?")
        return detail
    return run


def _junit_counts(xml: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if not xml.exists():
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        key = ("failed" if "failure" in kinds else "errors" if "error" in kinds
               else "skipped" if "skipped" in kinds else "passed")
        counts[key] += 1
    return counts


def _junit_failures(xml: Path) -> list[tuple[str, str]]:
    if not xml.exists():
        return []
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                out.append((f"{case.get('classname')}.{case.get('name')}", (child.get("message") or "")[:200]))
    return out


def _ops_stage(op: str, out: Path, device: torch.device, dry_run: bool) -> Callable[[float], str]:
    def run(limit: float) -> str:
        dtypes = ["fp32"] if dry_run else ["fp32", "bf16"]
        with _alarm(limit):
            rows = bench_ops.run([op], dtypes, dry_run, device, out / "bench.csv", echo=print, first_case_only=True,
                                 providers={"fused", "reference"})
        return _speedups(rows, "provider", ("case", "dtype", "mode"), "fused", "reference")
    return run


def _steps_stage(method: str, out: Path, device: torch.device, dry_run: bool) -> Callable[[float], str]:
    def run(limit: float) -> str:
        size = bench_steps.SMOKE_SIZE if dry_run else bench_steps.GPU_SIZE
        steps, warmup = (1, 0) if dry_run else (10, 3)  # one interpreted U2PL step is ~40 s on 2 cores
        with _alarm(limit):
            rows = bench_steps.run([method], size, device, out / "bench.csv", steps=steps, warmup=warmup,
                                   compile_mode="off", smoke=dry_run, count_breaks=False, echo=print)
        return _speedups(rows, "provider", ("case",), "fused", "reference")
    return run


def _speedups(rows: list[dict], column: str, key: tuple[str, ...], fast: str, slow: str) -> str:
    """"case/dtype/mode: reference / fused" ratios of the medians, one line."""
    by = {}
    for r in rows:
        if r.get("ms_median"):
            by.setdefault(tuple(r.get(k, "") for k in key), {})[r[column]] = float(r["ms_median"])
    parts = [f"{'/'.join(filter(None, k))} {v[slow] / v[fast]:.2f}x" for k, v in by.items()
             if fast in v and slow in v and v[fast] > 0]
    return f"{len(rows)} rows; reference / fused: " + (", ".join(parts) if parts else "n/a")


def plan(out: Path, device: torch.device, budget: float, dry_run: bool) -> list[Stage]:
    ops = sorted(bench_ops.OPS)
    stages = [Stage("tests", SHARES["tests"] * budget, _tests_stage(out, dry_run))]
    stages += [Stage(f"ops/{op}", SHARES["ops"] * budget / len(ops), _ops_stage(op, out, device, dry_run))
               for op in ops]
    stages += [Stage(f"steps/{m}", SHARES["steps"] * budget / len(STEP_METHODS), _steps_stage(m, out, device, dry_run))
               for m in STEP_METHODS]
    return stages


def run(out: Path, budget: float, dry_run: bool, device: torch.device) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for stage in plan(out, device, budget, dry_run):
        left = budget - (time.perf_counter() - t0)
        limit = min(stage.limit_s, left)
        if limit < 1:
            results.append({"stage": stage.name, "status": "skipped", "seconds": "0", "limit_s": f"{limit:.0f}",
                            "detail": "budget spent"})
            continue
        print(f"== {stage.name} (limit {limit:.0f} s)", flush=True)
        start = time.perf_counter()
        _expired.clear()
        try:
            status, detail = "passed", stage.run(limit)
        except StageTimeout as exc:
            status, detail = "timeout", str(exc)
        except Exception as exc:  # recorded, and the plan goes on
            if _expired:
                status, detail = "timeout", _expired[-1]
            else:
                status, detail = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
                traceback.print_exc()
        seconds = time.perf_counter() - start
        results.append({"stage": stage.name, "status": status, "seconds": f"{seconds:.1f}", "limit_s": f"{limit:.0f}",
                        "detail": detail})
        print(f"   {status} in {seconds:.1f} s: {detail}", flush=True)
        _write(out, results, stamp(device, timestamp=True), dry_run, time.perf_counter() - t0)  # kept if the run is killed
    return results


def _write(out: Path, results: list[dict], env: dict[str, str], dry_run: bool, total: float) -> None:
    write_rows(out / "gpu_check.csv", STAGE_FIELDS + STAMP_FIELDS, [r | env for r in results])
    lines = [f"# gpu_check{' (dry run, CPU, toy sizes)' if dry_run else ''}", "",
             f"{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']}; "
             f"{total:.0f} s in all.", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['detail'].replace('|', '/')} |" for r in results]
    lines += ["", "Op and step rows: `bench.csv` (bench_ops columns); tests: `tests.xml`, `tests.log`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.csv, bench.csv, report.md")
    parser.add_argument("--budget", type=float, help="seconds for the whole plan (default 480; dry run 2400, "
                                                     "the interpreter being slow)")
    parser.add_argument("--dry-run", action="store_true", help="the same plan on CPU at toy sizes")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 2400.0 if args.dry_run else 480.0
    if not args.budget > 0:
        parser.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device is visible to torch; use --dry-run to check the plan on CPU")
    results = run(args.out, args.budget, args.dry_run, device)
    print(f"report: {args.out / 'report.md'}")
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
