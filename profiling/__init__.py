"""Benchmarks and profilers; nothing in the package imports this folder. ``harness`` holds what
the benchmarks share: timing, the results CSV and the environment stamp."""
import os

import torch

# Without a GPU the kernels can only run in the Triton interpreter, which must be chosen before
# triton is first imported (semiseg_fast.ops imports the kernel modules): the CPU smoke runs need it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
