"""Loading pre-trained backbone weights from a local file (nothing is ever downloaded).

Accepted files: ``torch.save`` of a torchvision-named ResNet state dict, optionally wrapped in
``{"state_dict": ...}`` or ``{"model": ...}`` and optionally with ``module.`` (DataParallel/DDP)
and ``backbone.`` prefixes on the keys.  ``fc.*`` keys are ignored.  ``num_batches_tracked``
buffers are optional (older torchvision files lack them; BatchNorm starts them at 0).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .resnet import ResNet

__all__ = ["load_backbone_weights"]

_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "backbone.")
_MAX_LISTED = 12


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict of tensors (entries {bad[:_MAX_LISTED]!r} are not "
                         f"name -> tensor); wrappers understood: {_WRAPPER_KEYS}")
    return obj


def _strip(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def load_backbone_weights(backbone: ResNet, path: str | os.PathLike, strict: bool = True) -> dict:
    """Copy the tensors of ``path`` into ``backbone`` and report what happened.

    Returns ``{"loaded": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}``:
    keys copied; model keys absent from the file; file keys the model lacks; keys present in
    both with different shapes (not copied).  With ``strict`` any missing, unexpected or
    mismatched key raises ``ValueError`` before anything is copied; without it the keys that
    fit are copied and the rest reported.
    """
    if not isinstance(backbone, ResNet):
        raise TypeError(f"backbone must be a semiseg_fast.models.ResNet, got {type(backbone).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {str(path)!r} "
                                "(weights are only read from local files, never downloaded)")
    try:
        loaded_file = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{str(path)!r} is not a readable weights file ({type(e).__name__}: {first[:200]})") from e
    raw = _unwrap(loaded_file, path)

    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = _strip(key)
        if name.startswith("fc."):
            continue
        if name in state:
            raise ValueError(f"{path}: two entries map to {name!r} after removing the prefixes {_PREFIXES}")
        state[name] = value

    expected = backbone.state_dict()
    loaded, mismatched, unexpected = [], [], []
    for name, value in state.items():
        if name not in expected:
            unexpected.append(name)
        elif value.shape != expected[name].shape:
            mismatched.append(name)
        else:
            loaded.append(name)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    report = {"loaded": loaded, "missing": missing, "unexpected": unexpected, "mismatched": mismatched}

    if strict and (missing or unexpected or mismatched):
        msg = f"backbone weights {str(path)!r} do not fit the ResNet-{backbone.depth} backbone:"
        msg += _listing("missing", missing) if missing else ""
        msg += _listing("unexpected", unexpected) if unexpected else ""
        shapes = [f"{k} file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
        msg += _listing("shape mismatch", shapes) if mismatched else ""
        if backbone.deep_stem and "conv1.weight" in unexpected:
            msg += ("\nThe backbone has a deep stem (conv1.0/conv1.3/conv1.6 + 128-ch bn1): deep-stem "
                    "weights are not torchvision layout, and a torchvision file's single 7x7 conv1 does "
                    "not fit it.  Use a deep-stem ('resnet-c', UniMatch/U2PL) file, or strict=False to "
                    "load everything else and train the stem from scratch.")
        elif not backbone.deep_stem and "conv1.0.weight" in unexpected:
            msg += "\nThe file holds deep-stem weights; build the backbone with deep_stem=True."
        else:
            msg += "\nPass strict=False to load only the matching keys."
        raise ValueError(msg)

    backbone.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return report
