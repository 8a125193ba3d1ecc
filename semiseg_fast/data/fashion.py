"""Fashion-MNIST scenes: a real-image segmentation benchmark composited from Fashion-MNIST garments.

The garments are the real 28 x 28 grey images of Fashion-MNIST, read from the four gzip IDX
files that the Debian package ``dataset-fashion-mnist`` installs in
``/usr/share/datasets/fashion-mnist`` (or from a ``--root`` folder holding the same four files).
Training scenes only use garments of the ``train`` files, validation scenes only garments of the
``t10k`` files, so no garment is seen in both splits.

    id  name           id  name
    0   background     6   sandal
    1   t_shirt_top    7   shirt
    2   trouser        8   sneaker
    3   pullover       9   bag
    4   dress          10  ankle_boot
    5   coat

Scene model (default 80 x 80). The background is a colour gradient between two muted colours
(saturation 0.05-0.5, value 0.2-0.8) along a random direction, plus two random triangle-wave
stripe patterns (each up to +-0.05) that together make stripes or plaids. On it 2-4 garments
are drawn in order, each a garment picked uniformly from the split's file, rescaled bilinearly
(half-pixel centres, no antialiasing) to a square of side ``round(f * min(H, W))`` with ``f``
uniform in [0.3, 0.6], placed at a uniform random integer position fully inside the image, and
tinted with a random colour (any hue, saturation 0.3-1, value 0.6-1). Garments may overlap and
later ones occlude earlier ones.

Labels. With ``g`` the rescaled grey value of a garment (0-255), the garment owns exactly the
pixels of its box where ``g > GARMENT_THRESHOLD`` (25, about 10 % of full intensity, which keeps
the faint halo of the scans out of the masks); there its class replaces the label below. The
rest of its box shows, and keeps the label of, the layer below.

Image. Where a garment owns a pixel its intensity modulates its tint over the layer below:
``out = below + (tint * (0.4 + 0.6 g') - below) * min(1, 2 g')`` with ``g' = g / 255``, so the
garment's own shading stays visible and its darker parts still mostly cover the background. The
composite then gets a global gain (0.85-1.15) and mild pixel noise (standard deviation 0.01-0.03),
and is rounded to uint8.

Determinism. Scene ``i`` of seed ``s`` draws all its parameters from its own ``torch.Generator``
seeded by a 64-bit mix of ``(s, i)`` (validation scenes use indices ``SPLIT_OFFSETS["val"] + i``),
so it is the same whether generated alone or in any batch. Scene parameters are drawn before the
(resolution dependent) noise and live in normalised units (only the garment side and position are
rounded to whole pixels). Rendering uses only exactly rounded arithmetic (+, -, *, /, floor,
comparisons) and the CPU generator's uniforms, so for given garment files, seed and torch version
every machine renders the same pixels. The cache file name holds a digest of the garment files.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .augment import hsv_to_rgb
from .synthetic import SyntheticSegmentation, _as_size, _one_thread, cached_scenes

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "FASHION_CLASSES",
    "FILES",
    "FashionSegmentation",
    "GARMENT_THRESHOLD",
    "GENERATOR_VERSION",
    "Garments",
    "NUM_CLASSES",
    "Placement",
    "generate_fashion_scenes",
    "load_fashion",
    "load_garments",
    "locate_fashion_files",
    "read_idx",
    "render_garment_crops",
    "scene_layout",
]

#: Bump whenever a change alters the generated pixels, so stale cache files are never read.
GENERATOR_VERSION = 1

IGNORE_INDEX = 255

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"

#: (images, labels) file names of each split: train scenes use ``train``, val scenes ``t10k``.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: The ten Fashion-MNIST classes in label order (label k is class id k + 1 of the scenes).
FASHION_CLASSES = ("t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
CLASS_NAMES = ("background",) + FASHION_CLASSES
NUM_CLASSES = len(CLASS_NAMES)

#: A garment owns the pixels where its rescaled grey value (0-255) is strictly greater than this.
GARMENT_THRESHOLD = 25.0

GARMENT_SIDE = 28
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801  # uint8 data, 3 resp. 1 dimensions

#: Index offsets of the splits in the scene stream (as in the synthetic set).
SPLIT_OFFSETS = {"train": 0, "val": 1 << 40}

_MAX_GARMENTS = 4
_SLOT_DRAWS = 7  # garment, size, top, left, hue, saturation, value
_GLOBAL_DRAWS = 19
_SIZE_RANGE = (0.3, 0.6)


# -- the IDX files --------------------------------------------------------------------------------

def _read_gzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; EOFError = cut short
        raise DataError(f"{path}: not a readable gzip file (truncated or corrupt?): {exc}") from None


def read_idx(path: str | os.PathLike, magic: int, shape: tuple[int | None, ...]) -> np.ndarray:
    """The uint8 array of a gzip IDX file, checked against ``magic`` and ``shape``.

    ``shape`` gives the expected dimensions, ``None`` for any (at least 1). A wrong magic number,
    wrong dimensions, or a data length other than the header's is a ``DataError`` naming the file.
    """
    path = Path(path)
    data = _read_gzip(path)
    ndim = len(shape)
    header = 4 * (1 + ndim)
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
                        f"(uint8 data with {ndim} dimension{'s' if ndim > 1 else ''})")
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, the header alone has {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    for k, (got, want) in enumerate(zip(dims, shape)):
        if (want is None and got < 1) or (want is not None and got != want):
            raise DataError(f"{path}: IDX dimensions {dims}, expected {tuple('N' if w is None else w for w in shape)} "
                            f"(dimension {k} is wrong)")
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes after the data in"
        raise DataError(f"{path}: {what} IDX file: {len(data)} bytes, the header {dims} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@dataclass
class Garments:
    """The garments of one split: grey images uint8 [N, 28, 28] and Fashion-MNIST labels int64 [N] (0-9)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: tuple[str, str]  # the images and labels files

    def __len__(self) -> int:
        return self.images.shape[0]


def locate_fashion_files(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the four Fashion-MNIST files.

    With ``root`` every file must be there (else ``DataError`` naming the missing file). Without,
    the folder is ``DEFAULT_ROOT``; a missing file there is a ``DataError`` giving the command that
    installs the Debian package. Nothing is installed at run time: that is the user's decision.
    """
    needed = [name for pair in FILES.values() for name in pair]
    if root is not None and str(root) != "":
        folder = Path(root)
        for name in needed:
            if not (folder / name).is_file():
                raise DataError(f"--root {str(root)!r}: missing Fashion-MNIST file {folder / name}")
        return folder
    folder = Path(DEFAULT_ROOT)
    missing = [name for name in needed if not (folder / name).is_file()]
    if not missing:
        return folder
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    raise DataError(f"Fashion-MNIST file {folder / missing[0]} not found: install it with "
                    f"`{sudo}apt-get install {APT_PACKAGE}` or pass --root FOLDER holding the four Fashion-MNIST "
                    f".gz files ({', '.join(needed)})")


def load_garments(split: str, root: str | os.PathLike | None = None) -> Garments:
    """The garments of ``split`` ("train": the train files, "val": the t10k files), validated."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = locate_fashion_files(root)
    images_path, labels_path = (folder / name for name in FILES[split])
    images = read_idx(images_path, _IMAGES_MAGIC, (None, GARMENT_SIDE, GARMENT_SIDE))
    labels = read_idx(labels_path, _LABELS_MAGIC, (None,))
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(FASHION_CLASSES):
        first = int(np.argmax(labels >= len(FASHION_CLASSES)))
        raise DataError(f"{labels_path}: label {int(labels[first])} of garment {first} is outside 0-9")
    return Garments(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)),
                    (str(images_path), str(labels_path)))


def _files_digest(paths: Sequence[str | os.PathLike]) -> str:
    """A short digest of the (compressed) garment files: names a cache after the garments it used."""
    h = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            raise DataError(f"{path}: cannot read: {exc}") from None
        h.update(b"\0")
    return h.hexdigest()[:12]


# -- scene parameters -------------------------------------------------------------------------------

def _scene_seed(seed: int, index: int) -> int:
    """A well-spread 63-bit generator seed from (seed, index) (splitmix64 finaliser, no salted hash)."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + 0x5FA5A1CE0F0F0F0F) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


def _draws(seed: int, index: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All random numbers of one scene: the parameters first (resolution free), then the noise."""
    generator = torch.Generator().manual_seed(_scene_seed(int(seed), int(index)))
    uniforms = torch.rand(_MAX_GARMENTS * _SLOT_DRAWS + _GLOBAL_DRAWS, generator=generator, dtype=torch.float64)
    # triangular noise of unit variance: exact arithmetic on the generator's bits (see synthetic.py)
    pair = torch.rand(2, 3, height, width, generator=generator)
    return uniforms, (pair[0] - pair[1]) * math.sqrt(6.0)


def _lerp(u: float, lo: float, hi: float) -> float:
    return lo + (hi - lo) * u


def _pick(u: float, count: int) -> int:
    return min(int(math.floor(u * count)), count - 1)


def _rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    rgb = hsv_to_rgb(torch.tensor([h, s, v], dtype=torch.float32).view(3, 1, 1)).view(3)
    return tuple(float(c) for c in rgb)


@dataclass(frozen=True)
class Placement:
    """One garment of a scene, in drawing order: pool index, box (whole pixels) and tint (RGB 0-1)."""

    garment: int
    top: int
    left: int
    side: int
    tint: tuple[float, float, float]


def _layout(u: list[float], num_garments: int, height: int, width: int) -> list[Placement]:
    count = 2 + _pick(u[_MAX_GARMENTS * _SLOT_DRAWS], 3)
    base = min(height, width)
    out = []
    for k in range(count):
        g, size, top, left, hue, sat, val = u[k * _SLOT_DRAWS:(k + 1) * _SLOT_DRAWS]
        side = max(1, int(math.floor(_lerp(size, *_SIZE_RANGE) * base + 0.5)))
        out.append(Placement(
            garment=_pick(g, num_garments),
            top=_pick(top, height - side + 1),
            left=_pick(left, width - side + 1),
            side=side,
            tint=_rgb(hue, _lerp(sat, 0.3, 1.0), _lerp(val, 0.6, 1.0)),
        ))
    return out


def scene_layout(seed: int, index: int, num_garments: int, size: int | tuple[int, int]) -> list[Placement]:
    """The garments of scene ``index`` of stream ``seed`` (2-4, bottom first) for a pool of
    ``num_garments`` garments at image ``size``. Validation scenes are ``SPLIT_OFFSETS["val"] + i``."""
    height, width = _as_size(size)
    generator = torch.Generator().manual_seed(_scene_seed(int(seed), int(index)))
    uniforms = torch.rand(_MAX_GARMENTS * _SLOT_DRAWS + _GLOBAL_DRAWS, generator=generator, dtype=torch.float64)
    return _layout(uniforms.tolist(), num_garments, height, width)


# -- rendering: only exactly rounded operations (see the module docstring) -------------------------

def _resize(garment: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resampling of a [28, 28] float64 image to [side, side] (half-pixel centres, edges clamped)."""
    n = garment.shape[0]
    src = ((torch.arange(side, dtype=torch.float64) + 0.5) * (n / side) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    w = src - i0.double()
    rows = garment[i0] + (garment[i1] - garment[i0]) * w.view(-1, 1)  # [side, n]
    return rows[:, i0] + (rows[:, i1] - rows[:, i0]) * w.view(1, -1)


def _background(u: list[float], height: int, width: int) -> torch.Tensor:
    ys = ((torch.arange(height, dtype=torch.float32) + 0.5) / height).view(height, 1)
    xs = ((torch.arange(width, dtype=torch.float32) + 0.5) / width).view(1, width)
    h1, s1, v1, h2, s2, v2, gx, gy = u[:8]
    c1 = torch.tensor(_rgb(h1, _lerp(s1, 0.05, 0.5), _lerp(v1, 0.2, 0.8))).view(3, 1, 1)
    c2 = torch.tensor(_rgb(h2, _lerp(s2, 0.05, 0.5), _lerp(v2, 0.2, 0.8))).view(3, 1, 1)
    t = ((xs - 0.5) * _lerp(gx, -1.2, 1.2) + (ys - 0.5) * _lerp(gy, -1.2, 1.2) + 0.5).clamp(0.0, 1.0)
    pattern = torch.zeros(height, width)
    for kx, ky, phase, amp in (u[8:12], u[12:16]):
        z = xs * _lerp(kx, -7.0, 7.0) + ys * _lerp(ky, -7.0, 7.0) + phase
        pattern = pattern + _lerp(amp, 0.0, 0.2) * ((z - z.floor() - 0.5).abs() - 0.25)
    return c1 + (c2 - c1) * t + pattern


def _render_scene(u: list[float], noise: torch.Tensor, garments: Garments) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = noise.shape[-2:]
    return _composite(u[_MAX_GARMENTS * _SLOT_DRAWS + 1:], noise, garments, _layout(u, len(garments), height, width))


def _composite(glob: list[float], noise: torch.Tensor, garments: Garments, layout: list[Placement]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = noise.shape[-2:]
    image = _background(glob, height, width)
    labels = torch.zeros(height, width, dtype=torch.uint8)
    for p in layout:
        g = _resize(garments.images[p.garment].double(), p.side)
        on = g > GARMENT_THRESHOLD
        g = g / 255.0
        alpha = torch.where(on, (g * 2.0).clamp(max=1.0), 0.0).float()
        colour = torch.tensor(p.tint).view(3, 1, 1) * (0.4 + 0.6 * g).float()
        box = (slice(p.top, p.top + p.side), slice(p.left, p.left + p.side))
        below = image[:, box[0], box[1]]
        image[:, box[0], box[1]] = below + (colour - below) * alpha
        labels[box] = torch.where(on, int(garments.labels[p.garment]) + 1, labels[box])
    gain, noise_std = _lerp(glob[16], 0.85, 1.15), _lerp(glob[17], 0.01, 0.03)
    image = image * gain + noise * noise_std
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8), labels


def generate_fashion_scenes(
    garments: Garments,
    seed: int,
    indices: range | Sequence[int],
    size: int | tuple[int, int],
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes ``indices`` of stream ``seed`` from ``garments``: images uint8 [n, 3, H, W],
    labels uint8 [n, H, W] in ``0..NUM_CLASSES-1``. ``progress`` names a counter written to stderr."""
    height, width = _as_size(size)
    if len(garments) < 1:
        raise DataError(f"{garments.source[0]}: holds no garments")
    indices = list(indices)
    n = len(indices)
    images = torch.empty(n, 3, height, width, dtype=torch.uint8)
    labels = torch.empty(n, height, width, dtype=torch.uint8)
    with _one_thread():
        for k, index in enumerate(indices):
            uniforms, noise = _draws(seed, index, height, width)
            images[k], labels[k] = _render_scene(uniforms.tolist(), noise, garments)
            if progress and ((k + 1) % 64 == 0 or k + 1 == n):
                print(f"\rfashion {progress}: {k + 1}/{n} images", end="\n" if k + 1 == n else "",
                      file=sys.stderr, flush=True)
    return images, labels


def render_garment_crops(garments: Garments, seed: int, indices: range | Sequence[int], size: int,
                         side: tuple[float, float] = (0.55, 0.9)) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification samples for backbone pretraining (``semiseg_fast.pretrain``): sample ``i`` of
    ``indices`` is one garment of the pool drawn as a scene draws it (rescaled, tinted, over a scene
    background, with gain and noise) on a ``size`` x ``size`` image, its side ``side`` (fractions)
    of the image, at a random position. Returns images uint8 [n, 3, size, size] and the garments'
    Fashion-MNIST labels int64 [n] (0-9). Sample ``i`` of ``seed`` is the same alone or in a batch."""
    indices = list(indices)
    images = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(indices), dtype=torch.long)
    with _one_thread():
        for k, index in enumerate(indices):
            uniforms, noise = _draws(seed, index, size, size)
            u = uniforms.tolist()
            g, frac, top, left, hue, sat, val = u[:_SLOT_DRAWS]
            pixels = max(1, int(math.floor(_lerp(frac, *side) * size + 0.5)))
            placement = Placement(garment=_pick(g, len(garments)), top=_pick(top, size - pixels + 1),
                                  left=_pick(left, size - pixels + 1), side=pixels,
                                  tint=_rgb(hue, _lerp(sat, 0.3, 1.0), _lerp(val, 0.6, 1.0)))
            images[k] = _composite(u[_MAX_GARMENTS * _SLOT_DRAWS + 1:], noise, garments, [placement])[0]
            labels[k] = int(garments.labels[placement.garment])
    return images, labels


# -- one split, cached ------------------------------------------------------------------------------

@dataclass
class FashionSegmentation(SyntheticSegmentation):
    """One split held as two tensors, like ``SyntheticSegmentation`` (with this set's classes)."""

    num_classes: int = NUM_CLASSES
    class_names: tuple[str, ...] = CLASS_NAMES


def cache_file_name(split: str, num_images: int, size: int | tuple[int, int], seed: int, digest: str) -> str:
    """``digest`` identifies the garment files (``_files_digest``)."""
    height, width = _as_size(size)
    return f"fashion-v{GENERATOR_VERSION}-{split}-n{num_images}-{height}x{width}-seed{seed}-src{digest}.pt"


def load_fashion(
    split: str,
    num_images: int,
    size: int | tuple[int, int] = 80,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
) -> FashionSegmentation:
    """The ``split`` ("train" or "val") of the Fashion-MNIST scenes: scenes ``SPLIT_OFFSETS[split] + 0..N-1``
    built from the split's garment files (found by ``locate_fashion_files(root)``).

    With ``cache_dir`` the tensors are read from, or written (atomically) to, a file named after
    the split, count, size, seed, a digest of the garment files and ``GENERATOR_VERSION``.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    height, width = _as_size(size)
    folder = locate_fashion_files(root)
    path = None
    if cache_dir:
        digest = _files_digest([folder / name for name in FILES[split]])
        path = os.path.join(cache_dir, cache_file_name(split, num_images, (height, width), seed, digest))
    offset = SPLIT_OFFSETS[split]
    images, labels = cached_scenes(path, num_images, height, width, GENERATOR_VERSION, lambda: generate_fashion_scenes(
        load_garments(split, folder), seed, range(offset, offset + num_images), (height, width),
        progress=split if progress else None))
    return FashionSegmentation(images, labels, split, seed, cache_path=path)
