"""Data: the embedded synthetic benchmark, labeled/unlabeled splits and batched augmentations.

``build_dataset(cfg)`` is what the trainer calls: it returns a ``SegmentationData`` whose train
and val tensors (uint8, whole split in one tensor) are moved to the device once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .augment import (
    classmix_mask,
    cutmix_box,
    mix,
    mix_labels,
    strong_augment,
    u2pl_cutmix,
    u2pl_cutmix_mask,
    weak_augment,
)
from .splits import labeled_split, parse_labeled
from .synthetic import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    NUM_CLASSES,
    SyntheticSegmentation,
    generate_scenes,
    load_synthetic,
)

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "GENERATOR_VERSION",
    "NUM_CLASSES",
    "SegmentationData",
    "SyntheticSegmentation",
    "build_dataset",
    "classmix_mask",
    "cutmix_box",
    "generate_scenes",
    "labeled_split",
    "load_synthetic",
    "mix",
    "mix_labels",
    "parse_labeled",
    "strong_augment",
    "u2pl_cutmix",
    "u2pl_cutmix_mask",
    "weak_augment",
]


@dataclass
class SegmentationData:
    """Both splits of a data set: images uint8 [N, 3, H, W], labels uint8 [N, H, W] (255 = ignore)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    ignore_index: int = 255


def _build_synthetic(cfg) -> SegmentationData:
    cache_dir = getattr(cfg, "cache_dir", None) or None  # '' disables the cache
    progress = bool(getattr(cfg, "progress", False))
    common = dict(size=cfg.image_size, seed=cfg.data_seed, cache_dir=cache_dir, progress=progress)
    train = load_synthetic("train", cfg.num_train, **common)
    val = load_synthetic("val", cfg.num_val, **common)
    return SegmentationData(train.images, train.labels, val.images, val.labels,
                            train.num_classes, list(train.class_names), train.ignore_index)


#: Data set name -> builder taking the training config.
DATASETS = {"synthetic": _build_synthetic}


def build_dataset(cfg) -> SegmentationData:
    """The data set named ``cfg.data`` (fields used by "synthetic": num_train, num_val,
    image_size, data_seed, cache_dir, progress)."""
    if cfg.data not in DATASETS:
        raise ValueError(f"data: expected one of {sorted(DATASETS)}, got {cfg.data!r}")
    return DATASETS[cfg.data](cfg)
