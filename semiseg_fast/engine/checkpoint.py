"""Atomic checkpoints: a failed or interrupted write never destroys the previous file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..fileio import atomic_save  # noqa: F401  (re-exported: the engine's checkpoint writer)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e
