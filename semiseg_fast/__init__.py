"""semiseg-fast: a fused-kernel engine for semi-supervised semantic segmentation.

Sub-packages: ``models`` (plain-torch networks), ``data`` (synthetic scenes, splits, batched GPU
augmentations), ``engine`` (trainer, EMA, evaluation, checkpoints, logging), ``methods`` (one file
per semi-supervised method).  Triton kernels live in the repository's top-level ``kernels/`` folder
and are importable as ``semiseg_fast.kernels`` both from a checkout and from an installed wheel.
"""
from __future__ import annotations

import importlib.util as _ilu
import pathlib as _pathlib
import sys as _sys

__version__ = "0.1.0"

_PKG_DIR = _pathlib.Path(__file__).resolve().parent


def _mount_checkout_folder(name: str) -> None:
    """Expose the checkout's top-level ``<name>/`` folder as ``semiseg_fast.<name>``.

    A wheel installs the folder inside the package (pyproject package-dir), so this only acts in a
    plain checkout, where the folder sits beside the package instead of inside it.
    """
    full = f"{__name__}.{name}"
    if full in _sys.modules or (_PKG_DIR / name).is_dir():
        return
    folder = _PKG_DIR.parent / name
    init = folder / "__init__.py"
    if not init.is_file():
        return
    spec = _ilu.spec_from_file_location(full, init, submodule_search_locations=[str(folder)])
    module = _ilu.module_from_spec(spec)
    _sys.modules[full] = module
    spec.loader.exec_module(module)
    globals()[name] = module


_mount_checkout_folder("kernels")
_mount_checkout_folder("csrc")


def csrc_dir() -> _pathlib.Path:
    """Folder holding the CUDA/C++ sources (built on first use by torch.utils.cpp_extension)."""
    from . import csrc  # noqa: F401  (mounted above in a checkout, a real package in a wheel)

    return _pathlib.Path(_sys.modules[f"{__name__}.csrc"].__path__[0])
