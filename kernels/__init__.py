"""Triton kernels, one module per hot path; imported as ``semiseg_fast.kernels``.

Kernel modules import triton themselves, so importing this package stays cheap and works where
triton is absent (macOS, Windows); the ops fall back to the references there.
"""
