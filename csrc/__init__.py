"""CUDA C++ sources, compiled on first use on a CUDA machine by ``torch.utils.cpp_extension``.

Importable as ``semiseg_fast.csrc`` so the sources ship inside the wheel; ``semiseg_fast.csrc_dir()``
returns their folder.
"""
