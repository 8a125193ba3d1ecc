"""Kernel configuration sweep: tile sizes, warps/stages and dot precision of the fused kernels on
the benchmark cases, every candidate checked against the shipped configuration before it is timed.

    python -m profiling.tune                               # every op, realistic shapes (CUDA)
    python -m profiling.tune --op class_bank_contrast --dtype bf16
    python -m profiling.tune --smoke --no-csv              # tiny shapes and tiles (CPU: interpreter)

The knobs (``KNOBS``) are entries of the kernel modules' public tile tables (``TILES``,
``SETTINGS``, ``SAMPLED_TILES``, ``BANK_TILES``: dicts that the launchers read at every call). A
knob names its module, table and key (or a function of the dtype that picks the key) and sets a
candidate with ``unittest.mock.patch.dict`` on that one entry, so the shipped value is back
afterwards whatever the candidate did. Nothing autotunes at run time: timing candidates inside a
training step would synchronise with the host and make the first steps slow. For each op, case
and dtype, one knob at a time (the others at their shipped values), the sweep builds the
``fused`` provider of :mod:`profiling.bench_ops` with the candidate set, compares its forward
output and, for losses, the input gradient with the shipped configuration's (the percentile op
exactly; otherwise a max error within ``rtol`` of the largest value: other tiles sum in another
order and, for the graph, another precision), then times its forward + backward (statistics:
forward). A candidate that disagrees is recorded, not timed. Rows go to the results CSV with
provider ``fused[<knob>=<value>]`` (the key in lower case, or the table's name where the dtype
picks the key) and ``shipped`` in the note; the table gives each candidate's median and speed-up
over the shipped value. Adopting a winner is a one-line change of the table entry, after which
the GPU tests must pass (``pytest -m gpu``): the sweep checks one input per case, the tests check
the edge cases.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from . import bench_ops

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Knob:
    """One entry of a kernel module's tile table: ``module`` (its import path), ``table`` (the
    name of a dict the launchers read at every call), ``key`` (the entry, or a function of the
    dtype that picks it), the values to try and ``smoke`` (interpreter-sized ones)."""

    module: str
    table: str
    key: str | Callable[[torch.dtype], str]
    candidates: tuple
    smoke: tuple

    @property
    def name(self) -> str:
        """The knob in provider labels: the key, or the table where the dtype picks the key."""
        return (self.key if isinstance(self.key, str) else self.table).lower()

    def _table(self) -> dict:
        return getattr(importlib.import_module(self.module), self.table)

    def _key(self, dtype: torch.dtype) -> str:
        return self.key if isinstance(self.key, str) else self.key(dtype)

    def shipped(self, dtype: torch.dtype):
        return self._table()[self._key(dtype)]

    @contextlib.contextmanager
    def set(self, value, dtype: torch.dtype) -> Iterator[None]:
        with mock.patch.dict(self._table(), {self._key(dtype): value}):
            yield


def _bank_entry(dtype: torch.dtype) -> str:
    # the forward entry at the op's default precision (fp32: IEEE); the backward keeps its own
    from semiseg_fast.kernels import contrast

    return contrast.bank_tile_key(dtype in HALF, "ieee", backward=False)


# (BLOCK_P, BLOCK_N, warps, stages) of the class-bank forward: 64 anchors fill one wgmma row block;
# the rest trade registers against reuse of each bank tile (python -m profiling.aot shows which spill)
_BANK_CANDIDATES = ((64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2))

_K = "semiseg_fast.kernels."
KNOBS: dict[str, list[Knob]] = {
    "spatial_kl": [Knob(_K + "spatial_kl", "TILES", "BLOCK_J", (64, 128, 256, 512), (64, 128))],
    "entropy_percentile": [Knob(_K + "entropy_percentile", "TILES", "BLOCK_N", (1024, 2048, 4096), (512, 1024)),
                           Knob(_K + "entropy_percentile", "TILES", "BLOCK_OUT", (64, 128, 256), (64, 128)),
                           Knob(_K + "entropy_percentile", "TILES", "BLOCK_LOGIT", (32, 64, 128), (32, 64))],
    "sampled_contrast": [Knob(_K + "contrast", "SAMPLED_TILES", "BLOCK_M", (16, 32, 64), (16, 32))],
    "class_bank_contrast": [Knob(_K + "contrast", "BANK_TILES", _bank_entry, _BANK_CANDIDATES,
                                 ((16, 32, 4, 1), (32, 16, 4, 1)))],
    "graph_mix": [Knob(_K + "graph", "SETTINGS", "DOT_PRECISION", ("tf32x3", "ieee"), ("tf32x3", "ieee")),
                  Knob(_K + "graph", "SETTINGS", "CLASS_BLOCK", (32, 64, 128), (32, 64)),
                  Knob(_K + "graph", "SETTINGS", "MAX_BLOCK_X", (64, 128, 256), (16, 128))],
}


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    if isinstance(out, (tuple, list)):
        return [t for part in out for t in _tensors(part)]
    return []


def _results(modes: dict) -> list[torch.Tensor]:
    """The fused provider's forward output and, for losses, its input gradient (untimed)."""
    got = _tensors(modes["fwd"]())
    gradient = getattr(modes.get("fwd+bwd"), "gradient", None)
    return got + (_tensors(gradient()) if gradient is not None else [])


def agree(got: list[torch.Tensor], expected: list[torch.Tensor], rtol: float | None) -> bool:
    """Same shapes and values: equal when ``rtol`` is None, else the max error within rtol of the
    largest expected value (a wrong mask or tile moves whole entries, far beyond rounding)."""
    if len(got) != len(expected):
        return False
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            return False
        if rtol is None:
            if not torch.equal(a, b):
                return False
            continue
        a, b = a.double(), b.double()
        if not (torch.isfinite(a) == torch.isfinite(b)).all():
            return False
        err = (a - b).nan_to_num().abs().max().item() if a.numel() else 0.0
        if err > rtol * (b.nan_to_num().abs().max().item() if b.numel() else 0.0) + 1e-12:
            return False
    return True


def _build_fused(op: str, shape, dtype: torch.dtype, device: torch.device) -> dict | None:
    # the builders draw their inputs from their own generators, modules (the graph layer's convs)
    # from the global one: seeded, every build of a case computes the same function
    torch.manual_seed(0)
    with bench_ops.without_compiled():
        providers, _ = bench_ops.OPS[op][1](shape, dtype, device)
    fused = providers.get("fused")
    return fused if isinstance(fused, dict) else None


def run(op_names, dtype_names, smoke: bool, device: torch.device, out: Path | None, echo=print) -> list[dict]:
    env = bench_ops._environment()
    device_name = bench_ops.device_label(device)
    echo(f"device {device_name}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    rows = []
    for op in op_names:
        for case, shape in bench_ops.OPS[op][0](smoke):
            for dtype_name in dtype_names:
                dtype = bench_ops.DTYPES[dtype_name]
                shipped_modes = _build_fused(op, shape, dtype, device)
                if shipped_modes is None:
                    continue  # nothing fused to time for this case and dtype
                expected = _results(shipped_modes)
                rtol = None if op == "entropy_percentile" else (3e-2 if dtype in HALF else 1e-3)
                mode = "fwd+bwd" if "fwd+bwd" in shipped_modes else "fwd"
                for knob in KNOBS[op]:
                    shipped = knob.shipped(dtype)
                    # the shipped value first: every candidate's speed-up is against it
                    values = (shipped, *(v for v in (knob.smoke if smoke else knob.candidates) if v != shipped))
                    base = None
                    for value in values:
                        row = {**env, "device": device_name, "op": op, "case": case, "dtype": dtype_name,
                               "provider": f"fused[{knob.name}={value}]", "mode": mode,
                               "note": "shipped" if value == shipped else ""}
                        with knob.set(value, dtype):
                            modes = _build_fused(op, shape, dtype, device)
                            if not agree(_results(modes), expected, rtol):
                                rows.append({**row, "note": "disagrees with the shipped configuration: not timed"})
                                echo(f"{op:<11} {case:<8} {dtype_name:<5} {row['provider']:<34} DISAGREES")
                                continue
                            med, p20, p80 = bench_ops._timer(modes[mode], device)
                        base = med if value == shipped else base
                        rows.append({**row, "ms_median": f"{med:.4f}", "ms_p20": f"{p20:.4f}", "ms_p80": f"{p80:.4f}"})
                        speed = f"{base / med:5.2f}x of shipped" if base else ""
                        echo(f"{op:<11} {case:<8} {dtype_name:<5} {row['provider']:<34} {mode:<8} {med:9.3f} ms "
                             f"[{p20:.3f}, {p80:.3f}] {speed} {row['note']}")
    if out is not None and rows:
        bench_ops.append_rows(out, rows)
        echo(f"appended {len(rows)} rows to {out}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--op", action="append", choices=sorted(KNOBS), help="repeatable; default all")
    parser.add_argument("--dtype", action="append", choices=sorted(bench_ops.DTYPES),
                        help="repeatable; default fp32 and bf16 (smoke: fp32)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and tiles (CPU: the Triton interpreter)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtypes = args.dtype or (["fp32"] if args.smoke else ["fp32", "bf16"])
    out = None if args.no_csv else bench_ops.results_path(device)
    run(args.op or sorted(KNOBS), dtypes, args.smoke, device, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
