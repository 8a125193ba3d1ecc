"""File-backed data sets: images and label maps read from disk, streamed by a ``DataLoader``.

``FileSegData`` offers the interface of ``source.py`` (the one ``SegData`` offers for in-memory
sets) over a list of image / label files; ``voc.py`` and ``cityscapes.py`` only find the files.

Decoding. Images are decoded with Pillow into RGB uint8. Labels are uint8 index maps: palette
(mode ``P``) PNGs are read as their palette *indices*, never converted to colours; grayscale
(``L``) and 16/32-bit (``I``) PNGs as their values. Every label kind has a 256-entry lookup
table (identity for VOC, labelId -> trainId for Cityscapes) and a table of legal raw values;
a value that is not legal raises ``DataError`` naming the file and the value, when the label is
loaded (labels are not all read up front: 10k files would take minutes).

Training batches. Per image, on the CPU: the same random rescale (U(0.5, 2.0)), random crop
(padding where the rescaled image is smaller than the crop), and horizontal flip (p 0.5) as
``weak_augment`` (it *is* ``weak_augment`` on one image: bilinear image, nearest label, padded
label pixels 255, padded image pixels 0; unlabeled streams return the bool padding mask, True
outside the image). The crops are made by a ``torch.utils.data.DataLoader`` with ``num_workers``
worker processes (default ``min(4, CPUs)``), pinned memory on CUDA, and ``prefetch`` batches per
worker in flight ahead of the step.

Determinism and exact resume. The order of images follows ``IndexStream`` (a seeded permutation
per epoch; state = epoch and position). Each sample's crop randomness comes from its own
``torch.Generator`` seeded from (stream seed, epoch, position in the epoch), so a batch does not
depend on which worker made it, on the number of workers, or on where a run was resumed.
``state_dict()`` describes the batches the trainer has *consumed* (not those prefetched) and
``load_state_dict()`` restarts the loader from there. The trainer's ``generator`` (given to
``next``) is not used by file streams: their randomness is all in the per-sample generators.
The loader draws its worker base seed from its own generator, so creating it never touches the
global torch RNG (the trainer checkpoints that one).

Distributed data parallel. With ``world`` > 1 every rank walks the same index stream of the
*global* batch (``batch_size x world``) and loads only its slice ``[rank*b:(rank+1)*b]``; as the
crops are seeded per sample, the ranks together see exactly what one process of the global batch
sees. Validation is sharded ``rank::world``.

Validation. One image at a time at its full resolution: whole-image prediction, or sliding-window
inference (``predict_sliding``: windows of ``eval_window`` every ``eval_stride`` pixels, softmax
summed and divided by the number of windows per pixel, as UniMatch's ``evaluate(mode=
'sliding_window')``) when the image is larger than the window. A tqdm bar shows progress when
``progress`` is on.

Splits. ``split(labeled, seed, run_dir)`` draws the labeled images with seeded permutations (so a
smaller labeled set is inside a larger one for the same seed) and writes them as plain text, one
image id per line, to ``<run_dir>/splits/labeled.txt`` and ``unlabeled.txt`` (atomically; an
existing file with different content is never overwritten: that is an error). ``splits_dir``
(``--splits DIR``) reuses such a folder instead; its lines may also be UniMatch / U2PL split lines
(``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png``: the first path's file name,
without extension and ``_leftImg8bit``, is the id). ``unlabeled.txt`` may be left out: then the
unlabeled images are all the other training images.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..fileio import atomic_write_text
from .augment import weak_augment
from .splits import labeled_split
from .streams import IndexStream

__all__ = [
    "FileSegData",
    "FileStream",
    "LabelCodec",
    "Sample",
    "atomic_write_text",
    "check_dir",
    "default_num_workers",
    "list_ids",
    "read_image",
    "read_label",
    "sample_seed",
    "split_line_id",
]

IGNORE_INDEX = 255
SPLIT_FILES = ("labeled.txt", "unlabeled.txt")


def default_num_workers() -> int:
    """``min(4, CPUs this process may use)``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


# -- files ----------------------------------------------------------------------------------------

@dataclass(eq=False, frozen=True)
class LabelCodec:
    """How one kind of label file maps to class indices.

    ``lut`` uint8 [256]: raw value -> class index (or 255); ``valid`` bool [256]: which raw values
    may occur at all (anything else means a wrong or damaged file); ``what`` names the legal values
    in error messages.
    """

    lut: np.ndarray
    valid: np.ndarray
    what: str

    @staticmethod
    def identity(num_classes: int, ignore_index: int = IGNORE_INDEX) -> "LabelCodec":
        valid = np.zeros(256, dtype=bool)
        valid[:num_classes] = True
        valid[ignore_index] = True
        return LabelCodec(np.arange(256, dtype=np.uint8), valid, f"[0, {num_classes}) or {ignore_index} (ignore)")

    @staticmethod
    def table(mapping: dict[int, int], legal: Sequence[int], what: str,
              ignore_index: int = IGNORE_INDEX) -> "LabelCodec":
        """Raw values in ``mapping`` map to their class, other ``legal`` values to ``ignore_index``."""
        lut = np.full(256, ignore_index, dtype=np.uint8)
        for raw, cls in mapping.items():
            lut[raw] = cls
        valid = np.zeros(256, dtype=bool)
        valid[list(legal)] = True
        valid[list(mapping)] = True
        return LabelCodec(lut, valid, what)


@dataclass(frozen=True)
class Sample:
    """One image of a data set: its id, image file and label file (None: no label known)."""

    id: str
    image: Path
    label: Path | None = None
    codec: LabelCodec | None = None


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise DataError("reading image files needs Pillow: pip install pillow") from None
    return Image


def _unreadable(path: Path, kind: str, err: BaseException) -> DataError:
    if isinstance(err, FileNotFoundError):
        return DataError(f"{path}: {kind} file is missing")
    return DataError(f"{path}: cannot read the {kind} file, it is not a valid image or is damaged "
                     f"({type(err).__name__}: {err})")


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """RGB uint8 [3, H, W] of an image file (any mode Pillow reads is converted to RGB)."""
    Image = _pil()
    path = Path(path)
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(path, "image", err) from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def read_label(path: str | os.PathLike, codec: LabelCodec) -> np.ndarray:
    """Class indices uint8 [H, W] of a label file: raw values (palette indices for ``P`` PNGs)
    checked against ``codec.valid`` and mapped through ``codec.lut``."""
    Image = _pil()
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L"):
                raw = np.array(im)
            elif mode == "I" or mode.startswith("I;16"):
                raw = np.array(im).astype(np.int64)
            else:
                raise DataError(f"{path}: label image has mode {mode!r}; expected an index map (a palette "
                                f"'P' or grayscale 'L' PNG), not a colour rendering of the classes")
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(path, "label", err) from None
    if raw.dtype != np.uint8:
        outside = (raw < 0) | (raw > 255)
        if outside.any():
            raise DataError(f"{path}: label value {int(raw[outside][0])} is not {codec.what}")
        raw = raw.astype(np.uint8)
    bad = ~codec.valid[raw]
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (" ..." if values.size > 8 else "")
        raise DataError(f"{path}: label value {int(values[0])} is not {codec.what} "
                        f"(invalid values in this file: {shown})")
    return codec.lut[raw]


def load_sample(sample: Sample, with_label: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image uint8 [3, H, W] and, with ``with_label``, class indices uint8 [H, W] (else None) of one sample."""
    image = read_image(sample.image)
    if not with_label:
        return image, None
    if sample.label is None or sample.codec is None:
        raise DataError(f"{sample.image}: image {sample.id!r} has no label file")
    label = read_label(sample.label, sample.codec)
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise DataError(f"{sample.label}: label is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                        f"{sample.image} is {image.shape[2]}x{image.shape[1]}")
    return image, torch.from_numpy(label)


def list_ids(path: Path) -> list[str]:
    """Ids of a list file: the first token of each non-empty line (``#`` starts a comment)."""
    if not path.is_file():
        raise DataError(f"{path}: list file is missing")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the list file ({err})") from None
    return [split_line_id(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def split_line_id(line: str) -> str:
    """Image id of one split-file line: a bare id, or UniMatch / U2PL style paths (first path wins)."""
    token = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = token.rpartition(".")
    if dot and ext.lower() in ("jpg", "jpeg", "png"):
        token = stem
    return token.removesuffix("_leftImg8bit")


def _file_names(folder: Path) -> set[str]:
    """Names in a folder, from one directory scan (much faster than one ``stat`` per file)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries}
    except OSError:
        return set()


# -- per-sample randomness ------------------------------------------------------------------------

def sample_seed(seed: int, epoch: int, position: int) -> int:
    """63-bit generator seed of one sample from (stream seed, epoch, position in the epoch):
    splitmix64's finaliser over a combined word, so nearby triples give unrelated generators."""
    mask = (1 << 64) - 1
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xD1B54A32D192ED03 + int(position) * 0xC2B2AE3D27D4EB4F
         + 0x165667B19E3779F9) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


class _Failure(NamedTuple):
    """A ``DataError`` met in a worker, carried back as a value (the main process raises it)."""

    message: str


class _BatchPlan:
    """Endless per-step lists of (sample index, sample seed) for one rank, from a stream state.

    Iterated by the ``DataLoader`` in the main process (ahead of the trainer by the prefetch
    depth); the stream object keeps its own ``IndexStream`` for what was consumed.
    """

    def __init__(self, indices: torch.Tensor, global_batch: int, seed: int, state: dict, rank: int, batch: int):
        self.indices, self.global_batch, self.seed = indices, global_batch, seed
        self.state, self.rank, self.batch = dict(state), rank, batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stream = IndexStream(self.indices, self.global_batch, self.seed)
        stream.load_state_dict(self.state)
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        while True:
            indices, where = stream.next_with_positions()
            yield [(index, sample_seed(self.seed, *where[k])) for k, index in enumerate(indices.tolist())
                   if lo <= k < hi]


class _CropSet(Dataset):
    """``dataset[(index, seed)]`` -> (index, image float [3, c, c], label uint8 [c, c] or pad bool)."""

    def __init__(self, samples: Sequence[Sample], labeled: bool, crop: int, ignore_index: int):
        self.samples, self.labeled, self.crop, self.ignore_index = samples, labeled, crop, ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, spec: tuple[int, int]):
        index, seed = spec
        try:
            image, label = load_sample(self.samples[index], self.labeled)
        except DataError as err:
            return _Failure(str(err))
        generator = torch.Generator().manual_seed(seed)
        x, y = weak_augment(image[None], None if label is None else label[None], self.crop, generator=generator,
                            ignore_index=self.ignore_index)
        return index, x[0], (y[0].to(torch.uint8) if self.labeled else y[0])


class _ImageSet(Dataset):
    """``dataset[i]`` -> (image uint8 [3, H, W], label uint8 [H, W]) of validation sample ``i``."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            return load_sample(self.samples[i], True)
        except DataError as err:
            return _Failure(str(err))


def _collate(items: list):
    for item in items:
        if isinstance(item, _Failure):
            return item
    index, images, labels = zip(*items)
    return torch.tensor(index, dtype=torch.long), torch.stack(images), torch.stack(labels)


def _first(item):
    return item


def _worker_init(_worker_id: int) -> None:
    # a worker crops one image at a time: more threads per worker only oversubscribe the cores
    torch.set_num_threads(1)


def _loader(dataset: Dataset, *, num_workers: int, device: torch.device, prefetch: int, **kwargs) -> DataLoader:
    return DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=prefetch if num_workers else None,
        # the workers' base seed comes from this generator, not from the global RNG (checkpointed)
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


class FileStream:
    """Resumable stream of augmented batches of image files (see the module docstring)."""

    def __init__(self, samples: Sequence[Sample], indices: torch.Tensor, *, labeled: bool, batch_size: int,
                 seed: int, crop: int, device: torch.device, rank: int = 0, world: int = 1,
                 num_workers: int = 0, prefetch: int = 2, ignore_index: int = IGNORE_INDEX):
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"FileStream: need 0 <= rank < world, got rank={rank}, world={world}")
        self.samples, self.labeled, self.crop = samples, labeled, crop
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.device = torch.device(device)
        self.num_workers, self.prefetch, self.ignore_index = num_workers, prefetch, ignore_index
        #: what the trainer has consumed; the loader runs ahead on its own copy
        self.index = IndexStream(indices, batch_size * world, seed)
        self._batches = None

    def _start(self) -> None:
        plan = _BatchPlan(self.index.indices, self.batch_size * self.world, self.seed, self.index.state_dict(),
                          self.rank, self.batch_size)
        loader = _loader(_CropSet(self.samples, self.labeled, self.crop, self.ignore_index), batch_sampler=plan,
                         collate_fn=_collate, num_workers=self.num_workers, device=self.device,
                         prefetch=self.prefetch)
        self._batches = iter(loader)

    def next(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's batch on the device: images float32 [b, 3, crop, crop] in [0, 1] and labels int64
        [b, crop, crop] (255 on padding), or for an unlabeled stream the padding mask bool
        [b, crop, crop]. ``generator`` is unused (the interface's; file streams seed every sample's
        crop themselves)."""
        if self._batches is None:
            self._start()
        out = next(self._batches)
        if isinstance(out, _Failure):
            self.close()
            raise DataError(out.message)
        index, images, second = out
        b = self.batch_size
        expected = self.index.next()[self.rank * b : (self.rank + 1) * b]
        if not torch.equal(index, expected):  # pragma: no cover - would be a bug in _BatchPlan
            raise RuntimeError("FileStream: the loader's batch is not the stream's next batch")
        images = images.to(self.device, non_blocking=True)
        second = second.to(self.device, non_blocking=True)
        return images, (second.long() if self.labeled else second)

    def state_dict(self) -> dict:
        """Epoch and position of the batches consumed by the trainer (prefetched ones excluded)."""
        return self.index.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.index.load_state_dict(state)
        self.close()  # the next ``next`` restarts the loader at the consumed position

    def close(self) -> None:
        """Stop the worker processes (a later ``next`` starts new ones)."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


# -- the data set -----------------------------------------------------------------------------------

class FileSegData:
    """A segmentation data set of image / label files with the interface of ``source.py``.

    ``train`` is the training pool (labeled and unlabeled images; a sample without a label file
    can only be unlabeled), ``val`` the validation images (all labeled). ``eval_window`` 0 means
    whole-image validation; ``eval_stride`` None means 2/3 of the window (UniMatch).
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, name: str, train: Sequence[Sample], val: Sequence[Sample], class_names: Sequence[str], *,
                 root: str | os.PathLike | None = None, splits_dir: str | os.PathLike | None = None,
                 num_workers: int | None = None, prefetch: int = 2, eval_window: int = 0,
                 eval_stride: int | None = None, progress: bool = False):
        self.name = name
        self.root = None if root is None else Path(root)
        self.train, self.val = list(train), list(val)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        if not self.train:
            raise DataError(f"{self.root}: {name} has no training images")
        if not self.val:
            raise DataError(f"{self.root}: {name} has no validation images")
        self.splits_dir = None if splits_dir is None else Path(splits_dir)
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.prefetch = prefetch
        self.eval_window = int(eval_window or 0)
        self.eval_stride = eval_stride
        if self.eval_window and eval_stride is not None and not 1 <= eval_stride <= self.eval_window:
            raise ConfigError(f"--eval-stride: must be in [1, eval window {self.eval_window}], got {eval_stride}")
        self.progress = progress
        self._position = {s.id: i for i, s in enumerate(self.train)}
        if len(self._position) != len(self.train):
            raise DataError(f"{self.root}: {name} lists a training image twice")
        self._val_ids = {s.id for s in self.val}

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return len(self.val)

    @property
    def train_ids(self) -> list[str]:
        return [s.id for s in self.train]

    def validate(self, name: str) -> "FileSegData":
        """Labels are checked as they are loaded (naming the file); nothing to check up front."""
        return self

    # -- splits ---------------------------------------------------------------------------------
    def draw_split(self, labeled: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labeled / unlabeled pool indices drawn from ``seed`` (subclasses add protocols)."""
        return self._labeled_split(self.num_train, labeled, seed, "training images")

    @staticmethod
    def _labeled_split(n: int, labeled: float | int, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return labeled_split(n, labeled, seed)
        except ValueError as err:
            raise ConfigError(f"--labeled: {err} (the pool is {n} {what})") from None

    def split(self, labeled: float | int, seed: int, run_dir: str | os.PathLike | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted labeled and unlabeled training indices; written to ``<run_dir>/splits``.

        With ``splits_dir`` the split is read from that folder (``labeled`` and ``seed`` unused).
        """
        if self.splits_dir is not None:
            lab, unl = self.read_splits(self.splits_dir)
        else:
            lab, unl = self.draw_split(labeled, seed)
        lab, unl = lab.sort().values, unl.sort().values
        for i in lab.tolist():
            sample = self.train[i]
            if sample.label is None:
                where = f" (from {self.splits_dir / SPLIT_FILES[0]})" if self.splits_dir is not None else ""
                raise DataError(f"{sample.image}: image {sample.id!r} is in the labeled split{where} but has no "
                                f"label file")
        if run_dir is not None:
            self.write_splits(Path(run_dir) / "splits", lab, unl)
        return lab, unl

    def read_splits(self, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        if not folder.is_dir():
            raise ConfigError(f"--splits: {folder} does not exist or is not a folder")
        chosen: dict[str, list[int]] = {}
        first_seen: dict[int, Path] = {}
        for name in SPLIT_FILES:
            path = folder / name
            if name == "unlabeled.txt" and not path.exists():
                continue
            positions = []
            for line_no, ident in self._split_file_ids(path):
                pos = self._position.get(ident)
                if pos is None:
                    why = ("is a validation image" if ident in self._val_ids
                           else f"is not an image of the {self.name} training set")
                    raise DataError(f"{path}:{line_no}: image {ident!r} {why}"
                                    + (f" under {self.root}" if self.root is not None else ""))
                if pos in first_seen:
                    raise DataError(f"{path}:{line_no}: image {ident!r} is listed again "
                                    f"(also in {first_seen[pos]}); labeled and unlabeled must not overlap")
                first_seen[pos] = path
                positions.append(pos)
            chosen[name] = positions
        lab = torch.tensor(chosen["labeled.txt"], dtype=torch.long)
        if lab.numel() == 0:
            raise DataError(f"{folder / 'labeled.txt'}: lists no image")
        if "unlabeled.txt" in chosen:
            unl = torch.tensor(chosen["unlabeled.txt"], dtype=torch.long)
        else:
            rest = torch.ones(self.num_train, dtype=torch.bool)
            rest[lab] = False
            unl = rest.nonzero().flatten()
        return lab, unl

    @staticmethod
    def _split_file_ids(path: Path) -> list[tuple[int, str]]:
        if not path.is_file():
            raise DataError(f"{path}: split file is missing")
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read the split file ({err})") from None
        return [(k + 1, split_line_id(line)) for k, line in enumerate(lines)
                if line.strip() and not line.lstrip().startswith("#")]

    def write_splits(self, folder: Path, lab: torch.Tensor, unl: torch.Tensor) -> None:
        """``labeled.txt`` / ``unlabeled.txt`` (one id per line) of ``lab`` / ``unl`` int [n] training
        indices, atomically; never replaces a file with different content (a run directory keeps the
        split it was trained on)."""
        if self.splits_dir is not None and folder.resolve() == self.splits_dir.resolve():
            return
        texts = {name: "".join(self.train[i].id + "\n" for i in part.tolist())
                 for name, part in zip(SPLIT_FILES, (lab, unl))}
        for name, text in texts.items():
            path = folder / name
            if path.exists():
                try:
                    same = path.read_text() == text
                except (OSError, UnicodeDecodeError):
                    same = False
                if not same:
                    raise DataError(f"{path}: the run directory already holds a different split; use another "
                                    f"--out, or pass --splits {folder} to train on the saved one")
        for name, text in texts.items():
            path = folder / name
            if not path.exists():
                atomic_write_text(path, text)

    # -- training -------------------------------------------------------------------------------
    def train_stream(self, indices: torch.Tensor, *, labeled: bool, batch_size: int, seed: int, crop: int,
                     device: torch.device, rank: int = 0, world: int = 1) -> FileStream:
        """Stream over ``indices`` int [n] of the training pool (see ``FileStream.next``)."""
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        if labeled:
            for i in indices.tolist():
                if self.train[i].label is None:
                    raise DataError(f"{self.train[i].image}: image {self.train[i].id!r} has no label file")
        return FileStream(self.train, indices, labeled=labeled, batch_size=batch_size, seed=seed, crop=crop,
                          device=device, rank=rank, world=world, num_workers=self.num_workers,
                          prefetch=self.prefetch, ignore_index=self.ignore_index)

    # -- validation -----------------------------------------------------------------------------
    def val_batches(self, *, device: torch.device, batch_size: int = 1, rank: int = 0,
                    world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Validation images ``rank::world`` at full size, one at a time (sizes differ): images float
        [1, 3, H, W] in [0, 1] and labels int64 [1, H, W] on ``device``. ``batch_size`` is unused
        here (the evaluation sends ``batch_size`` sliding windows through the model together)."""
        device = torch.device(device)
        loader = _loader(_ImageSet(self.val[rank::world]), batch_size=None, collate_fn=_first,
                         num_workers=self.num_workers, device=device, prefetch=self.prefetch)
        for item in loader:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            image, label = item
            yield (image.to(device, non_blocking=True)[None].float().div_(255),
                   label.to(device, non_blocking=True)[None].long())

    def num_val_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> int:
        return len(self.val[rank::world])


def check_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder is missing")
    return path
