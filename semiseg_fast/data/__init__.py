"""Data: the embedded synthetic benchmark, labeled/unlabeled splits and batched augmentations.

``build_dataset(cfg)`` is what the trainer calls: it returns a ``SegData`` whose train and val
tensors (uint8, whole split in one tensor) are moved to the device once.
"""
from __future__ import annotations

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
from .registry import DATASETS, SegData, build_dataset
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
    "SegData",
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
