"""What every benchmark here shares: timing, the results CSV and the environment stamp.

bench_ops, bench_steps, bench_u2pl_stage, run_all, gpu_check, report and aot take these from here
(tune through bench_ops), so that a row means the same thing whichever command wrote it:

* timing: :func:`time_op` (an op's median, p20 and p80), :func:`time_calls` (one time per call, for
  whole steps), :func:`quantiles`, :func:`peak_memory` and :func:`counting_host_syncs`;
* the stamp: :func:`device_label` and :func:`stamp` (date, commit, torch, triton, device);
* CSV rows: ``FIELDS`` (the benchmark columns), :func:`results_path`, :func:`append_rows` (which
  refuses a CSV of other columns), :func:`read_rows` and :func:`write_rows` (a whole file at once).

Triton is imported only inside the functions that need it: ``profiling.aot`` must decide how
triton is first imported (never the interpreter) after importing this module.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import os
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["date", "commit", "device", "torch", "triton", "op", "case", "dtype", "provider", "mode",
          "ms_median", "ms_p20", "ms_p80", "peak_mb", "floor_mb", "gb_s", "copy_gb_s", "pct_of_copy",
          "gflop", "tflop_s", "matmul_tflop_s", "pct_of_matmul",
          # whole-step rows (profiling/bench_steps.py)
          "images_s", "host_syncs", "graph_breaks", "note"]


# -- timing ---------------------------------------------------------------------------------------

def quantiles(ms: list[float]) -> tuple[float, float, float]:
    """Median, p20 and p80 of ``ms`` (numpy's linear percentiles: within the times measured)."""
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), q[1], q[7]


def time_calls(fn: Callable[[], object], n: int, device: torch.device, *,
               synchronise: bool = False) -> list[float]:
    """Milliseconds of each of ``n`` calls of ``fn``, in call order. On CUDA, events around each
    call, the calls queued back to back as a training loop runs them; with ``synchronise``, the
    wall clock around each call and a device synchronisation, for work whose host side is what is
    measured. Elsewhere the wall clock."""
    cuda = device.type == "cuda"
    if cuda and not synchronise:
        events = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_op(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float]:
    """Median, p20 and p80 milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (25 ms of
    warm-up, 100 ms of repetitions, the L2 cache cleared before each), elsewhere one untimed call
    and five timed ones (the interpreter is slow: the CPU runs check the plumbing, not the speed)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return med, p20, p80
    fn()
    return quantiles(time_calls(fn, 5, device))


class Peak:
    """Peak device memory of a :func:`peak_memory` block, MiB above its start (``None`` off CUDA)."""
    mb: float | None = None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Measure the block's peak allocated device memory above what was allocated when it began:
    what the timed work adds to the inputs. Off CUDA there is no allocator to ask and it stays None."""
    peak = Peak()
    if device.type != "cuda":
        yield peak
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield peak
    peak.mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20


class SyncCount:
    """Host synchronisations counted by :func:`counting_host_syncs` (``None`` off CUDA)."""
    value: int | None = None


@contextlib.contextmanager
def counting_host_syncs(device: torch.device) -> Iterator[SyncCount]:
    """Count the CUDA host synchronisations inside the block: with ``set_sync_debug_mode("warn")``
    every synchronising call warns, and the warnings are recorded, not printed. Each recorded
    warning costs host time, so the block should not be the one that is timed. Off CUDA there is
    nothing to count and the count stays None."""
    count = SyncCount()
    if device.type != "cuda":
        yield count
        return
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode("default")
    count.value = sum("synchroniz" in str(w.message) for w in caught)


# -- the stamp ------------------------------------------------------------------------------------

def device_label(device: torch.device) -> str:
    """The device's name as the CSV rows and the results file name carry it."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def stamp(device: torch.device | None = None, *, timestamp: bool = False) -> dict[str, str]:
    """``date``, ``commit``, ``torch`` and ``triton`` (``"none"`` when it is not installed), and
    ``device`` when one is given: what each row carries so that rows of several runs, machines and
    versions can share a file. ``timestamp``: the date to the second, for a one-off report."""
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
    date = datetime.datetime.now().isoformat(timespec="seconds") if timestamp else datetime.date.today().isoformat()
    out = {"date": date, "commit": commit, "torch": torch.__version__, "triton": triton_version}
    return out if device is None else out | {"device": device_label(device)}


# -- CSV rows -------------------------------------------------------------------------------------

def results_path(device: torch.device) -> Path:
    """``profiling/results/<device>.csv``, where every benchmark of this suite appends its rows."""
    return RESULTS / f"{device_label(device).replace(' ', '_')}.csv"


def append_rows(out: Path, rows: list[dict]) -> None:
    """Append result rows to a CSV of FIELDS columns (header written for a new file). A file of
    other columns is refused rather than extended: its old rows would be read under wrong names."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        with out.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header is not None and header != FIELDS:
            raise ValueError(f"out: {out} has the columns {header}, not this version's {FIELDS}; "
                             f"move it aside or write to another file")
    new = not out.exists() or out.stat().st_size == 0
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Every row of a CSV with a header, as dicts of strings."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Replace ``path`` with ``rows`` under the columns ``fields`` (keys outside them dropped),
    through a temporary file: a run killed while writing leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
