"""Checkpoints: written atomically (a failed or interrupted write never destroys the previous file)
and read with ``weights_only=True`` (tensors and plain Python values only, so a crafted file cannot
run code). Every way a file can be unreadable is one ``CheckpointError`` line naming the file."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileio import atomic_save  # noqa: F401  (re-exported: the engine's checkpoint writer)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The dict saved at ``path`` (tensors moved to ``map_location``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint is empty (0 bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses every global (a class, a callable) by name; other refusals are damage
        named = [line.strip() for line in str(e).splitlines() if "global" in line.lower()]
        if named:
            raise CheckpointError(f"{path}: refused to load, the file holds Python objects that could run code "
                                  f"({named[-1][:200]})") from e
        raise CheckpointError(f"{path}: truncated or not a checkpoint (unreadable pickle data)") from e
    except Exception as e:  # truncated zip, foreign format, bad record
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({first[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state
