"""Data: the synthetic benchmark, Fashion-MNIST scenes, VOC / Cityscapes files, splits, batched augmentations.

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
from .cityscapes import CITYSCAPES_CLASSES, CityscapesData, load_cityscapes
from .fashion import (
    FASHION_CLASSES,
    FashionSegmentation,
    Garments,
    generate_fashion_scenes,
    load_fashion,
    load_garments,
    locate_fashion_files,
)
from .files import FileSegData, FileStream
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
from .voc import VOC_CLASSES, VOCData, load_voc

__all__ = [
    "CITYSCAPES_CLASSES",
    "CLASS_NAMES",
    "CityscapesData",
    "DATASETS",
    "FASHION_CLASSES",
    "FashionSegmentation",
    "FileSegData",
    "FileStream",
    "GENERATOR_VERSION",
    "Garments",
    "NUM_CLASSES",
    "SegData",
    "SyntheticSegmentation",
    "VOCData",
    "VOC_CLASSES",
    "build_dataset",
    "classmix_mask",
    "cutmix_box",
    "generate_fashion_scenes",
    "generate_scenes",
    "labeled_split",
    "load_cityscapes",
    "load_fashion",
    "load_garments",
    "load_synthetic",
    "load_voc",
    "locate_fashion_files",
    "mix",
    "mix_labels",
    "parse_labeled",
    "strong_augment",
    "u2pl_cutmix",
    "u2pl_cutmix_mask",
    "weak_augment",
]
