"""Cityscapes (fine annotations), read from a user's local copy (``--data cityscapes``).

Layout (``--root`` is the folder holding ``leftImg8bit`` and ``gtFine``)::

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                                     (or ..._gtFine_labelTrainIds.png, used when present)

An image's id is its file name without ``_leftImg8bit.png`` (``aachen_000000_000019``).
19 classes (``CITYSCAPES_CLASSES``); ``labelIds`` files are mapped to train ids with the standard
table (``LABEL_TO_TRAIN``: 7 road -> 0, 8 sidewalk -> 1, ..., 33 bicycle -> 18) through a
256-entry lookup table, every other id (0-6, 9, 10, 14-16, 18, 29, 30 and 255, i.e. -1 written as
a byte) to 255 = ignored. A ``labelIds`` value above 33 other than 255, or a ``labelTrainIds``
value outside 0-18 and 255, raises ``DataError`` naming the file (a wrong or damaged label).

Protocols: the labeled images are a fraction (1/16, 1/8, 1/4, 1/2 -> 186, 372, 744, 1488, the
counts of the U2PL / UniMatch split files) or count (``--labeled``) of the 2975 training images,
drawn from ``--data-seed``; the unlabeled ones are the rest. Splits are written to
``<out>/splits/{labeled,unlabeled}.txt``; ``--splits DIR`` reuses such a folder (UniMatch / U2PL
split files work as they are). Validation: the 500 ``val`` images at full resolution (2048x1024).

What the papers used (pass it yourself; the defaults are CPU-sized): UniMatch trains with
``--crop 801`` (R50 / R101, batch 2+2 per GPU, 240 epochs, lr 5e-3, OHEM loss) and evaluates with
a sliding window of 801 and stride 2/3 of it (534): here the default ``--eval-window`` on
Cityscapes is the training ``--crop`` and ``--eval-stride`` 2/3 of the window, as in UniMatch.
U2PL: crop 769 (8 GPUs x 2+2). CTT / MLLC: 256x512 resized images (not provided here).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, DataError
from .files import FileSegData, LabelCodec, Sample, _file_names, check_dir

__all__ = ["CITYSCAPES_CLASSES", "LABEL_TO_TRAIN", "CityscapesData", "label_ids_codec", "load_cityscapes",
           "train_ids_codec"]

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

#: labelId -> trainId of the official cityscapesScripts ``labels.py`` (every other id is ignored)
LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


def label_ids_codec() -> LabelCodec:
    """``*_labelIds.png``: ids 0-33 and 255 are legal, mapped by ``LABEL_TO_TRAIN`` (others -> 255)."""
    return LabelCodec.table(LABEL_TO_TRAIN, legal=[*range(34), 255], what="a Cityscapes labelId (0-33, or 255)")


def train_ids_codec() -> LabelCodec:
    """``*_labelTrainIds.png``: 0-18 and 255, read as they are."""
    return LabelCodec.identity(len(CITYSCAPES_CLASSES))


def _split(root: Path, split: str, ids: LabelCodec, train_ids: LabelCodec) -> list[Sample]:
    image_dir = check_dir(root / "leftImg8bit" / split, "Cityscapes leftImg8bit/" + split)
    label_dir = check_dir(root / "gtFine" / split, "Cityscapes gtFine/" + split)
    samples, seen = [], {}
    for city in sorted(p.name for p in image_dir.iterdir() if p.is_dir()):
        labels = _file_names(label_dir / city)
        for name in sorted(n for n in _file_names(image_dir / city) if n.endswith(IMAGE_SUFFIX)):
            ident = name[: -len(IMAGE_SUFFIX)]
            if ident in seen:
                raise DataError(f"{image_dir / city / name}: image id {ident!r} also in {seen[ident]}")
            seen[ident] = image_dir / city
            if ident + TRAIN_IDS_SUFFIX in labels:
                label, codec = label_dir / city / (ident + TRAIN_IDS_SUFFIX), train_ids
            elif ident + LABEL_IDS_SUFFIX in labels:
                label, codec = label_dir / city / (ident + LABEL_IDS_SUFFIX), ids
            else:
                raise DataError(f"{label_dir / city / (ident + LABEL_IDS_SUFFIX)}: label file is missing "
                                f"(for image {image_dir / city / name})")
            samples.append(Sample(ident, image_dir / city / name, label, codec))
    if not samples:
        raise DataError(f"{image_dir}: no <city>/*{IMAGE_SUFFIX} images")
    return samples


class CityscapesData(FileSegData):
    """Cityscapes fine (train pool = the 2975 ``train`` images, validation = the 500 ``val`` ones)."""

    def __init__(self, root: str | os.PathLike, **options):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: Cityscapes root folder is missing")
        ids, train_ids = label_ids_codec(), train_ids_codec()
        train = _split(root, "train", ids, train_ids)
        val = _split(root, "val", ids, train_ids)
        super().__init__("cityscapes", train, val, CITYSCAPES_CLASSES, root=root, **options)


def load_cityscapes(cfg) -> CityscapesData:
    """``CityscapesData`` from a ``TrainConfig``; the eval window defaults to ``--crop`` (UniMatch)."""
    if not cfg.root:
        raise ConfigError("--root: cityscapes needs the folder holding leftImg8bit/ and gtFine/")
    if cfg.protocol is not None:
        raise ConfigError(f"--protocol: cityscapes has one protocol (a fraction of the 2975 train images, "
                          f"--labeled); got {cfg.protocol!r}")
    window = cfg.crop if cfg.eval_window is None else cfg.eval_window
    return CityscapesData(cfg.root, splits_dir=cfg.splits or None, num_workers=cfg.num_workers, eval_window=window,
                          eval_stride=cfg.eval_stride, progress=cfg.progress)
