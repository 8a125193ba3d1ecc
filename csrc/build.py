"""Build-on-first-use of the CUDA sources in this folder, with a clean fallback.

``load("radix_select")`` compiles ``radix_select.cu`` with ``torch.utils.cpp_extension.load``
the first time a process asks (torch caches the build under ``TORCH_EXTENSIONS_DIR``, so later
processes only link it) and returns the module. Wherever it cannot be built - a CPU-only torch,
no CUDA device, no nvcc, a compile error - it returns None after one ``RuntimeWarning`` naming
the reason, and callers use their Triton kernel instead: an optional speed-up never becomes an
exception. The answer, module or None, is kept for the life of the process.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_FOLDER = Path(__file__).resolve().parent
_BUILT: dict[str, ModuleType | None] = {}
_LOCK = threading.Lock()


def _build(name: str) -> ModuleType:
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is built without CUDA")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible")
    from torch.utils.cpp_extension import load as cpp_load

    return cpp_load(name=f"semiseg_{name}", sources=[str(_FOLDER / f"{name}.cu")],
                    extra_cuda_cflags=["-O3"], verbose=False)


def load(name: str) -> ModuleType | None:
    """The compiled extension ``<name>.cu`` of this folder, or None where it cannot be built."""
    with _LOCK:
        if name not in _BUILT:
            try:
                _BUILT[name] = _build(name)
            # a build fails in many types (RuntimeError, OSError, CalledProcessError, ImportError);
            # every one of them means the same here: fall back to Triton
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"semiseg_fast.csrc: {name}.cu is not available "
                              f"({type(exc).__name__}: {exc}); the Triton kernel runs instead",
                              RuntimeWarning, stacklevel=3)
                _BUILT[name] = None
        return _BUILT[name]
