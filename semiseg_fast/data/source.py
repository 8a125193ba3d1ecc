"""What the trainer asks of a data set: a labeled split, resumable batch streams, validation.

Every object that ``build_dataset`` returns offers the same interface, so the trainer never looks
at how images are stored (one in-memory tensor for the generated sets, files for real ones):

- ``num_train``, ``num_val``, ``num_classes``, ``class_names``, ``ignore_index``;
- ``split(labeled, seed, run_dir)`` -> sorted labeled and unlabeled training indices (int64);
- ``train_stream(indices, labeled=, batch_size=, seed=, crop=, device=, rank=, world=)`` -> a
  stream whose ``next(generator)`` returns one step's batch on the device: images float
  [b, 3, crop, crop] in [0, 1] and labels int64 [b, crop, crop] with the ignore index on padding,
  or for an unlabeled stream the padding mask bool [b, crop, crop] (True outside the source
  image); ``state_dict()`` and ``load_state_dict()`` make resume exact;
- ``val_batches(device=, batch_size=, rank=, world=)`` -> this rank's validation images
  ``rank::world`` as (float [b, 3, H, W] in [0, 1], int64 [b, H, W]) pairs on the device, with
  ``num_val_batches(batch_size, rank, world)`` of them; ``eval_window`` and ``eval_stride`` say
  how the evaluation (``engine.evaluate.val_confusion``) predicts them: whole images (0) or
  UniMatch's sliding window; ``progress`` whether it shows a bar.

Distributed data parallel: with ``world`` > 1 a stream draws the *global* batch (``batch_size``
x ``world`` indices, the same on every rank because the index stream is seeded alike) and keeps
the rank's slice, and the random crop parameters are drawn for the global batch too. So ``world``
ranks of ``b`` images see exactly the images and crops one process of ``world x b`` images would
see: the sampler is a distributed sampler with no padding and no duplicated images. Validation
is sharded ``rank::world`` and the matrices are summed by the trainer with one all-reduce.
"""
from __future__ import annotations

import torch

from .augment import weak_augment
from .streams import IndexStream

__all__ = ["TensorStream", "pinned_to"]


def pinned_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that does not synchronise: a pageable copy waits, a pinned one is queued.
    ``tensor`` any dtype [...], returned as it is on ``device``."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class TensorStream:
    """Batches of an in-memory split: a seeded index stream and the device-side weak augmentation.

    ``images`` uint8 [N, 3, H, W] and ``labels`` uint8 [N, H, W] (None for an unlabeled stream)
    already live on the training device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, indices: torch.Tensor, *,
                 batch_size: int, seed: int, crop: int, rank: int = 0, world: int = 1):
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"TensorStream: need 0 <= rank < world, got rank={rank}, world={world}")
        self.images, self.labels = images, labels
        self.batch_size, self.crop, self.rank, self.world = batch_size, crop, rank, world
        self.index = IndexStream(indices, batch_size * world, seed)

    def next(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's weak-augmented batch: images float32 [b, 3, crop, crop] in [0, 1] and labels
        int64 [b, crop, crop] (255 on padding), or for an unlabeled stream the padding mask bool
        [b, crop, crop]."""
        b = self.batch_size
        idx = self.index.next()[self.rank * b : (self.rank + 1) * b]
        idx = pinned_to(idx, self.images.device)
        x = self.images[idx].float().div_(255)
        y = None if self.labels is None else self.labels[idx].long()
        return weak_augment(x, y, crop=self.crop, generator=generator, shard=(self.rank, self.world))

    def state_dict(self) -> dict:
        return self.index.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.index.load_state_dict(state)
