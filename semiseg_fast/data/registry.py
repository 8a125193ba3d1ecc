"""Data-set registry: maps ``--data`` names to loaders returning one ``SegData`` bundle."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError


@dataclass
class SegData:
    """Training and validation tensors of one data set (uint8 images [N,3,H,W], labels [N,H,W])."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = 255

    def validate(self, name: str) -> "SegData":
        for split, labels in (("train", self.train_labels), ("val", self.val_labels)):
            bad = (labels.long() >= self.num_classes) & (labels.long() != self.ignore_index)
            if bool(bad.any()):
                first = int(bad.flatten(1).any(1).nonzero()[0])
                value = int(labels[first][bad[first]][0])
                raise DataError(f"{name} {split} labels: image {first} holds label {value}, outside "
                                f"[0, {self.num_classes}) and not the ignore index {self.ignore_index}")
        return self


def _synthetic(cfg) -> SegData:
    from .synthetic import load_synthetic

    if cfg.root:
        raise ConfigError("--root: the synthetic data set is generated, it takes no root folder")
    cache = cfg.cache_dir or None
    train = load_synthetic("train", cfg.num_train, cfg.image_size, seed=cfg.data_seed, cache_dir=cache, progress=cfg.progress)
    val = load_synthetic("val", cfg.num_val, cfg.image_size, seed=cfg.data_seed, cache_dir=cache, progress=cfg.progress)
    return SegData(train.images, train.labels, val.images, val.labels, train.num_classes, tuple(train.class_names))


DATASETS = {"synthetic": _synthetic}


def build_dataset(cfg) -> SegData:
    if cfg.data not in DATASETS:
        raise ConfigError(f"--data: unknown data set {cfg.data!r}; expected one of {sorted(DATASETS)}")
    if cfg.root and not Path(cfg.root).is_dir():
        raise DataError(f"--root: data root {cfg.root!r} does not exist or is not a folder")
    return DATASETS[cfg.data](cfg).validate(cfg.data)
