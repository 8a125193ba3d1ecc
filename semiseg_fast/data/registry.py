"""Data-set registry: maps ``--data`` names to loaders returning one ``SegData`` bundle."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .source import TensorStream, pinned_to
from .splits import labeled_split


@dataclass
class SegData:
    """Training and validation tensors of one data set: images uint8 [N, 3, H, W], labels uint8
    [N, H, W]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = 255
    #: whole images at validation (no sliding window), and no progress bar: it takes a moment
    eval_window: int = 0
    eval_stride: int | None = None
    progress: bool = False

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_val(self) -> int:
        return int(self.val_images.shape[0])

    def split(self, labeled: float | int, seed: int, run_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Labeled / unlabeled indices: a seeded prefix of one permutation (see ``labeled_split``)."""
        return labeled_split(self.num_train, labeled, seed)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # moved once per device and kept: the whole split lives on the GPU, so no step waits for data
        if getattr(self, "_device", None) != device:
            self._device = device
            self._train_on = (pinned_to(self.train_images, device), pinned_to(self.train_labels, device))
        return self._train_on

    def train_stream(self, indices: torch.Tensor, *, labeled: bool, batch_size: int, seed: int, crop: int,
                     device: torch.device, rank: int = 0, world: int = 1) -> TensorStream:
        """Stream over ``indices`` int [n] of the training set (see ``TensorStream.next``)."""
        images, labels = self._on(torch.device(device))
        return TensorStream(images, labels if labeled else None, indices, batch_size=batch_size, seed=seed,
                            crop=crop, rank=rank, world=world)

    def val_batches(self, *, device: torch.device, batch_size: int, rank: int = 0,
                    world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Validation images ``rank::world`` in batches of ``batch_size``: images float [b, 3, H, W]
        in [0, 1] and labels int64 [b, H, W] on ``device``."""
        images, labels = self.val_images[rank::world], self.val_labels[rank::world]
        for start in range(0, images.shape[0], batch_size):
            yield (images[start : start + batch_size].to(device, non_blocking=True).float().div_(255),
                   labels[start : start + batch_size].to(device, non_blocking=True).long())

    def diagnostic_images(self, indices: torch.Tensor, *, device: torch.device, limit: int = 32
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the logged diagnostics only: the first ``limit`` training images of ``indices`` int [n],
        whole, as images float [b, 3, H, W] in [0, 1] and their labels int64 [b, H, W] on ``device``.
        The trainer scores pseudo-labels of unlabeled images with them; no loss ever sees them."""
        idx = torch.as_tensor(indices, dtype=torch.long)[:limit]
        return (self.train_images[idx].to(device).float().div_(255), self.train_labels[idx].to(device).long())

    def num_val_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> int:
        return -(-self.val_images[rank::world].shape[0] // batch_size)

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


def _fashion(cfg) -> SegData:
    from .fashion import load_fashion

    cache, root = cfg.cache_dir or None, cfg.root or None
    train = load_fashion("train", cfg.num_train, cfg.image_size, seed=cfg.data_seed, root=root, cache_dir=cache,
                         progress=cfg.progress)
    val = load_fashion("val", cfg.num_val, cfg.image_size, seed=cfg.data_seed, root=root, cache_dir=cache,
                       progress=cfg.progress)
    return SegData(train.images, train.labels, val.images, val.labels, train.num_classes, tuple(train.class_names))


def _voc(cfg):
    from .voc import load_voc

    return load_voc(cfg)


def _cityscapes(cfg):
    from .cityscapes import load_cityscapes

    return load_cityscapes(cfg)


DATASETS = {"synthetic": _synthetic, "fashion": _fashion, "voc": _voc, "cityscapes": _cityscapes}


def build_dataset(cfg) -> SegData:
    if cfg.data not in DATASETS:
        raise ConfigError(f"--data: unknown data set {cfg.data!r}; expected one of {sorted(DATASETS)}")
    if cfg.root and not Path(cfg.root).is_dir():
        raise ConfigError(f"--root: data root {cfg.root!r} does not exist or is not a folder")
    return DATASETS[cfg.data](cfg).validate(cfg.data)
