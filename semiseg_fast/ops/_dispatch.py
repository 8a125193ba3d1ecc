"""The one switch between fused kernels and references, and the checks every op shares.

Mode resolution (first that is set wins):

1. the ``impl=`` argument of a public op,
2. the innermost :func:`use_impl` context,
3. the environment variable ``SEMISEG_IMPL``,
4. ``"auto"``.

``"reference"`` runs ``semiseg_fast.reference``; ``"triton"`` runs the registered fused kernel
(on CPU through the Triton interpreter) and fails up front, naming the op, when there is none;
``"auto"`` runs the fused kernel for CUDA tensors when one is registered and the reference
otherwise.

Each op module imports its kernel module explicitly (``from ..kernels import spatial_kl``, the
top-level ``kernels/`` folder mounted as ``semiseg_fast.kernels``) and hands it to its
:class:`HotPath`, which registers the module's ``LAUNCHERS = {"<op name>": launcher, ...}``.
That happens once, when ``semiseg_fast.ops`` is imported, so that the lookup a public op does
while torch.compile traces it is a plain dict read (an import would break the graph). The kernel
modules import nothing from the package: the arrow stays ``kernels <- ops``. A launcher takes the
same arguments as the op's reference body (listed in each op module) and receives contiguous
tensors; it may carry an ``accepts(*args) -> bool`` attribute, and inputs it does not accept run
the reference under "auto" and fail, naming their dtypes, under "triton". Without Triton the
import fails, the error is kept, and "triton" reports it. A launcher may return intermediate
results that the op finishes in torch for both implementations alike (spatial KL's per-image
statistics); an op that must prepare an argument differently for the reference asks
:meth:`HotPath.launcher` which one will run.

Eager calls read ``SEMISEG_IMPL`` at every call. Compiled graphs fix the mode when traced:
``use_impl`` sets a module global that dynamo guards (entering or leaving a context re-traces),
and they see ``SEMISEG_IMPL`` as it was when ``semiseg_fast.ops`` was imported (set it in the
shell for A/B runs; switch inside a process with ``use_impl`` or ``impl=``). The mode is
process-wide, not per thread.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch
from torch import Tensor

IMPLS = ("auto", "reference", "triton")
ENV_VAR = "SEMISEG_IMPL"

KERNELS: dict[str, Callable] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_override: str | None = None


def register_kernel(op: str, launcher: Callable) -> None:
    """Make ``launcher`` the fused implementation of ``semiseg::<op>``."""
    if not callable(launcher):
        raise TypeError(f"launcher: expected a callable for op {op!r}, got {type(launcher)}")
    KERNELS[op] = launcher


def _check_mode(mode: object, source: str) -> str:
    if mode not in IMPLS:
        raise ValueError(f"{source}: expected one of {IMPLS}, got {mode!r}")
    return mode


@contextlib.contextmanager
def use_impl(mode: str) -> Iterator[None]:
    """Run the ops inside the block with ``mode`` ("reference", "triton" or "auto")."""
    global _override
    _check_mode(mode, "use_impl")
    previous, _override = _override, mode
    try:
        yield
    finally:
        _override = previous


# What compiled graphs see of the environment variable (dynamo reads this global as a guarded
# constant). Tracing os.environ itself is not supported by every torch version, and
# torch.compiler.assume_constant_result would import torch._dynamo (1.5 s) on every import.
_ENV_AT_IMPORT = os.environ.get(ENV_VAR, "")


def _env_mode() -> str:
    if torch.compiler.is_compiling():
        return _ENV_AT_IMPORT
    return os.environ.get(ENV_VAR, "")


def requested_mode(impl: str | None = None) -> str:
    """The mode an op called with ``impl`` runs in (argument, context, env var, "auto")."""
    if impl is not None:
        return _check_mode(impl, "impl")
    if _override is not None:
        return _override
    env = _env_mode()
    return _check_mode(env, ENV_VAR) if env else "auto"


def _missing_kernel(op: str, hot_path: str) -> NotImplementedError:
    why = _IMPORT_ERRORS.get(hot_path) or f"kernels/{hot_path}.py registers no {op!r} in LAUNCHERS"
    return NotImplementedError(
        f"semiseg::{op}: the 'triton' implementation was requested (impl=, use_impl or "
        f"{ENV_VAR}) but there is no kernel to run; {why}. Use 'reference' or 'auto' meanwhile.")


class HotPath:
    """Dispatch for the ops of one hot path; ``kernels`` is its kernel module (``kernels/<name>.py``)
    or the ImportError its import raised."""

    def __init__(self, name: str, kernels: ModuleType | ImportError) -> None:
        self.name = name
        if isinstance(kernels, ImportError):  # triton missing (macOS, Windows): references only
            _IMPORT_ERRORS[name] = f"kernels/{name}.py failed to import ({kernels})"
            return
        for op, launcher in kernels.LAUNCHERS.items():
            register_kernel(op, launcher)

    def resolve(self, impl: str | None, *ops: str) -> str:
        """Mode for a call that will run ``ops`` (forward and backward): checked up front, so
        "triton" without a kernel fails before anything runs, not halfway through backward."""
        mode = requested_mode(impl)
        if mode == "triton":
            for op in ops:
                if op not in KERNELS:
                    raise _missing_kernel(op, self.name)
        return mode

    def launcher(self, op: str, mode: str, device: torch.device, *args) -> Callable | None:
        """The kernel :meth:`launch` would run ``op`` on ``args`` with, or None where it would run
        the reference; raises where ``launch`` would ("triton" without a kernel that takes them).

        For the rare op that prepares its arguments differently for the reference (spatial KL's
        float64 gradient scale); the others just call :meth:`launch`.
        """
        if not (mode == "triton" or (mode == "auto" and device.type == "cuda")):
            return None
        launcher = KERNELS.get(op)
        if launcher is None and mode == "triton":
            raise _missing_kernel(op, self.name)
        # a launcher may declare which inputs it takes (e.g. no float64 for 32-bit radix keys)
        accepts = getattr(launcher, "accepts", None)
        if accepts is not None and not accepts(*args):
            if mode == "triton":
                dtypes = sorted({str(a.dtype) for a in args if isinstance(a, Tensor)})
                raise NotImplementedError(
                    f"semiseg::{op}: the 'triton' kernel does not take these inputs ({', '.join(dtypes)}); "
                    f"use 'reference' or 'auto' for them")
            return None
        return launcher

    def launch(self, op: str, mode: str, device: torch.device, reference: Callable, *args):
        """Run ``op`` on ``args`` with its kernel or ``reference``, as ``mode`` and ``device`` say.

        ``args``: the op's launcher arguments (tensors of any dtype and shape [...], and Python
        values); ``reference`` takes the same ones. Called inside the custom ops, where it runs
        eagerly (torch.compile keeps the op opaque). Tensors are made contiguous first (a copy only
        for strided inputs): the layout kernels index, and the one the fake registrations promise
        for the outputs.
        """
        launcher = self.launcher(op, mode, device, *args)
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        return (launcher or reference)(*args)


# ------------------------------------------------------------------------------------------------
# Precision policy and input checks shared by the op modules
# ------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """References run bf16/fp16 inputs in float32 (the kernels accumulate in float32 too)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def fp32_matmul_precision() -> str:
    """"tf32" or "ieee": how PyTorch runs float32 matmuls on CUDA right now. Reads the per-backend
    API (``torch.backends.cuda.matmul.fp32_precision``; the legacy
    ``torch.set_float32_matmul_precision`` and ``allow_tf32`` set it too, and "none" inherits the
    generic ``torch.backends.fp32_precision``), because the legacy getter raises once the new API
    has been used. Torch versions without it use the legacy getter ("highest" -> IEEE)."""
    matmul = getattr(torch.backends.cuda, "matmul", None)
    if hasattr(matmul, "fp32_precision"):
        value = matmul.fp32_precision
        if value == "none":
            value = getattr(torch.backends, "fp32_precision", "none")
        return "tf32" if value in ("tf32", "bf16") else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def check_tensor(name: str, x: object) -> None:
    """``x`` a Tensor (any dtype, any shape [...]); a TypeError naming ``name`` otherwise."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def check_float(name: str, x: object, layout: str, ndim: int) -> None:
    """``x`` float16/bfloat16/float32/float64 with ``ndim`` dimensions, described in errors as
    ``layout`` (e.g. "[N, D]")."""
    check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(x.shape)}")


def check_like(name: str, x: object, ref_name: str, ref: Tensor, *, dtype: bool = True) -> None:
    """``x`` a Tensor on the device (and unless ``dtype=False`` of the dtype) of ``ref`` (any dtype,
    any shape [...]): nothing is cast or moved."""
    check_tensor(name, x)
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected the device of {ref_name} ({ref.device}), "
                         f"got {x.device}")


def check_shape(name: str, x: Tensor, shape: Sequence[int], layout: str) -> None:
    """``x`` (any dtype) of exactly ``shape``, described in errors as ``layout`` (e.g. "[B, H, W]")."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {layout} = {tuple(shape)}, got {tuple(x.shape)}")


def check_dtype(name: str, x: Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """``x`` (any shape [...]) of one of ``dtypes``."""
    if x.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected {names}, got {x.dtype}")


def check_real(name: str, value: object) -> float:
    """A Python real number (bool is not one); returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    value = check_real(name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return value


def check_range(name: str, x: Tensor, low: int | None, high: int | None, what: str) -> None:
    """Every value of ``x`` int [...] in [low, high) (None: unbounded): what a kernel would read
    out of bounds otherwise. Eagerly on the CPU the check is free and names the first bad value; on
    a GPU reading it back would sync with the host (and a compiled graph cannot branch on it), so
    ``torch._assert_async`` stops the stream there instead (the message says ``what``), before any
    kernel reads past its buffer."""
    if x.numel() == 0:
        return
    ok = torch.ones((), dtype=torch.bool, device=x.device)
    if low is not None:
        ok = ok & (x >= low).all()
    if high is not None:
        ok = ok & (x < high).all()
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            bad = x[((x < low) if low is not None else False) | ((x >= high) if high is not None else False)]
            raise ValueError(f"{name}: expected {what}, got {int(bad.flatten()[0])}")
    else:
        torch._assert_async(ok, f"{name}: expected {what}")


def check_finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value

