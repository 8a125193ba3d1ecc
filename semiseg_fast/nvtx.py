"""NVTX ranges around the phases of a train step, for nsys/ncu.

Uses the ``nvtx`` package when importable (cheapest, works without CUDA context), else
``torch.cuda.nvtx`` when CUDA is present, else nothing: ranges cost nothing on CPU runs.
"""
from __future__ import annotations

import contextlib

import torch

try:  # optional at run time: absent on the GPU image and on most CPU machines
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None


_record_functions = False


def record_functions(enabled: bool) -> None:
    """Also emit ``torch.profiler.record_function`` ranges (profile_step.py turns this on)."""
    global _record_functions
    _record_functions = enabled


def backend() -> str:
    if _nvtx is not None:
        return "nvtx"
    if torch.cuda.is_available():
        return "torch.cuda.nvtx"
    return "none"


@contextlib.contextmanager
def nvtx_range(name: str):
    """Mark one phase (``data``, ``teacher``, ``student``, ``loss``, ``backward``, ...)."""
    if _record_functions and not torch.compiler.is_compiling():
        with torch.profiler.record_function(f"phase/{name}"), _nvtx_only(name):
            yield
    else:
        with _nvtx_only(name):
            yield


@contextlib.contextmanager
def _nvtx_only(name: str):
    if torch.compiler.is_compiling():  # ranges inside a compiled region would break the graph
        yield
    elif _nvtx is not None:
        with _nvtx.annotate(name):
            yield
    elif torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield
