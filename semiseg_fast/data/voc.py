"""PASCAL VOC 2012 with the SBD augmented labels, read from a user's local copy (``--data voc``).

Layout (``--root`` is the ``VOC2012`` folder; a ``VOCdevkit`` folder holding it works too)::

    VOC2012/
      JPEGImages/<id>.jpg                    all images
      SegmentationClass/<id>.png             VOC labels (palette PNGs, read as indices)
      ImageSets/Segmentation/train.txt       the 1464 training ids
      ImageSets/Segmentation/val.txt         the 1449 validation ids
      SegmentationClassAug/<id>.png          optional: SBD labels (grayscale PNGs, 12031 files)
      ImageSets/Segmentation/train_aug.txt   optional: the 10582 augmented training ids

21 classes (``VOC_CLASSES``); 255 is ignored (VOC's object boundaries). Label values other than
0-20 and 255 raise ``DataError`` naming the file when it is loaded.

Training pool. With the SBD labels, the 10582 "aug" ids: ``train_aug.txt`` when present, else
every id with a ``SegmentationClassAug`` PNG, minus the validation ids in both cases (SBD labels
some VOC val images; they never enter training), plus ``train.txt``. Without them, ``train.txt``.
A training image's label is its ``SegmentationClassAug`` PNG when there is one, else its
``SegmentationClass`` PNG. Validation always uses ``val.txt`` with ``SegmentationClass``.

Protocols (``--protocol``; default ``blended`` when ``SegmentationClassAug`` exists, else
``classic``; ``--labeled`` gives the count or fraction):

- ``classic``: the labeled images are drawn from the 1464 ``train.txt`` ids (the papers' counts
  92, 183, 366, 732, 1464; the fractions 1/16, 1/8, 1/4, 1/2 of 1464 give exactly these), the
  unlabeled ones are the rest of the pool (10582 - labeled with SBD);
- ``blended``: the labeled images are a fraction (1/16, 1/8, 1/4, 1/2) or count of the whole
  10582 pool, the unlabeled ones the rest. Fractions round half up (1/16 -> 661; U2PL's and
  UniMatch's split files have 662: pass ``--labeled 662`` or ``--splits`` with their files).

Splits are drawn from ``--data-seed`` and written to ``<out>/splits/{labeled,unlabeled}.txt``;
``--splits DIR`` reuses a folder of such files (UniMatch / U2PL split files work as they are).

What the papers used (pass it yourself; the defaults are CPU-sized): UniMatch trains VOC with
``--crop 321`` on the classic splits and ``--crop 513`` on the blended ones (IPixMatch R50-321
and R101-513), batch 2+2 per GPU on 4 GPUs (one process: ``--batch-size 8``; torchrun with 4 processes:
``--batch-size 2``, the batch size is per process), 80 epochs, and evaluates whole
images at their original size (the default here: ``--eval-window 0``). U2PL: crop 513. CTT and
MLLC (DeepLabV2): crop 321.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .files import FileSegData, LabelCodec, Sample, _file_names, check_dir, list_ids

__all__ = ["PROTOCOLS", "VOC_CLASSES", "VOCData", "find_voc_root", "load_voc"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PROTOCOLS = ("classic", "blended")


def find_voc_root(root: str | os.PathLike) -> Path:
    """The ``VOC2012`` folder: ``root`` itself, or ``root/VOC2012`` (a ``VOCdevkit`` folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: VOC root folder is missing")
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        return root / "VOC2012"
    return root


class VOCData(FileSegData):
    """VOC 2012 (+SBD) as a ``FileSegData`` with the classic and blended protocols."""

    def __init__(self, root: str | os.PathLike, *, protocol: str | None = None, **options):
        root = find_voc_root(root)
        images = check_dir(root / "JPEGImages", "VOC JPEGImages")
        voc_labels = check_dir(root / "SegmentationClass", "VOC SegmentationClass")
        lists = check_dir(root / "ImageSets" / "Segmentation", "VOC ImageSets/Segmentation")
        aug = root / "SegmentationClassAug"
        has_aug = aug.is_dir()
        codec = LabelCodec.identity(len(VOC_CLASSES))

        image_names, voc_names = _file_names(images), _file_names(voc_labels)
        aug_names = _file_names(aug) if has_aug else set()

        def image_of(ident: str, listed_in: Path) -> Path:
            if ident + ".jpg" not in image_names:
                raise DataError(f"{images / (ident + '.jpg')}: image file is missing (listed in {listed_in})")
            return images / (ident + ".jpg")

        val_list = lists / "val.txt"
        val = []
        for ident in _unique(list_ids(val_list), val_list):
            if ident + ".png" not in voc_names:
                raise DataError(f"{voc_labels / (ident + '.png')}: label file is missing (listed in {val_list})")
            val.append(Sample(ident, image_of(ident, val_list), voc_labels / (ident + ".png"), codec))
        val_ids = {s.id for s in val}

        train_list = lists / "train.txt"
        train_ids = _unique(list_ids(train_list), train_list)
        for ident in train_ids:
            if ident in val_ids:
                raise DataError(f"{train_list}: id {ident!r} is also in {val_list}")
            if ident + ".png" not in voc_names and ident + ".png" not in aug_names:
                raise DataError(f"{voc_labels / (ident + '.png')}: label file is missing (listed in {train_list})")
        aug_list = lists / "train_aug.txt"
        if aug_list.is_file():
            aug_ids, aug_source = list_ids(aug_list), aug_list
        elif has_aug:
            aug_ids = sorted(name[:-4] for name in aug_names if name.endswith(".png"))
            aug_source = aug
        else:
            aug_ids, aug_source = [], None
        pool_ids = sorted(set(train_ids) | (set(aug_ids) - val_ids))

        train, in_train_list = [], set(train_ids)
        for ident in pool_ids:
            label = (aug / (ident + ".png") if ident + ".png" in aug_names
                     else voc_labels / (ident + ".png") if ident + ".png" in voc_names else None)
            train.append(Sample(ident, image_of(ident, train_list if ident in in_train_list else aug_source), label,
                                codec if label is not None else None))

        if protocol is None:
            protocol = "blended" if has_aug else "classic"
        if protocol not in PROTOCOLS:
            raise ConfigError(f"--protocol: expected one of {PROTOCOLS} for voc, got {protocol!r}")
        if protocol == "blended" and not has_aug:
            raise ConfigError(f"--protocol blended: needs the SBD labels in {aug} (not found); "
                              "use --protocol classic or add SegmentationClassAug")
        self.protocol = protocol
        self.classic_ids = train_ids
        super().__init__("voc", train, val, VOC_CLASSES, root=root, **options)

    def draw_split(self, labeled: float | int, seed: int):
        """``classic``: labeled drawn from ``train.txt``; ``blended``: from the whole pool."""
        if self.protocol == "blended":
            return self._labeled_split(self.num_train, labeled, seed, "images of the blended (train_aug) pool")
        classic = torch.tensor([self._position[i] for i in self.classic_ids], dtype=torch.long)
        lab_local, _ = self._labeled_split(classic.numel(), labeled, seed, "train.txt images (classic protocol)")
        lab = classic[lab_local]
        rest = torch.ones(self.num_train, dtype=torch.bool)
        rest[lab] = False
        return lab, rest.nonzero().flatten()


def _unique(ids: list[str], path: Path) -> list[str]:
    seen = set()
    for ident in ids:
        if ident in seen:
            raise DataError(f"{path}: id {ident!r} is listed twice")
        seen.add(ident)
    return ids


def load_voc(cfg) -> VOCData:
    """``VOCData`` from a ``TrainConfig`` (``--root``, ``--protocol``, ``--splits``, ``--num-workers``,
    ``--eval-window``, ``--eval-stride``, ``--progress``)."""
    if not cfg.root:
        raise ConfigError("--root: voc needs the VOC2012 folder (JPEGImages, SegmentationClass, ImageSets, "
                          "optionally SegmentationClassAug)")
    return VOCData(cfg.root, protocol=cfg.protocol, splits_dir=cfg.splits or None, num_workers=cfg.num_workers,
                   eval_window=cfg.eval_window or 0, eval_stride=cfg.eval_stride, progress=cfg.progress)
