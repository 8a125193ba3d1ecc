"""Batched data augmentation on device tensors (no PIL, no torchvision, no per-pixel Python).

Conventions: images are float [B, 3, H, W] in [0, 1]; labels are int64 [B, H, W] whose padded or
unknown pixels hold ``ignore_index`` (255). Every random number comes from the ``generator``
argument, which must live on the data's device, so a run is reproducible from the generator's
state and a CUDA pipeline never synchronises with the host.

Geometry (``weak_augment``) is one affine warp per sample. Photometric changes
(``strong_augment``) never touch labels. Mixing masks (``cutmix_box``, ``classmix_mask``,
``u2pl_cutmix_mask``) are bool [B, H, W], True where the pixel comes from the *second* source,
and ``mix`` / ``mix_labels`` apply them to images, labels, confidences or padding masks alike,
so the ignore index travels with the pixels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "classmix_mask",
    "colour_jitter",
    "cutmix_box",
    "gaussian_blur",
    "grayscale",
    "hsv_to_rgb",
    "mix",
    "mix_labels",
    "rgb_to_hsv",
    "strong_augment",
    "u2pl_cutmix",
    "u2pl_cutmix_mask",
    "weak_augment",
]

IGNORE_INDEX = 255

# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=generator.device)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


# -- geometry ------------------------------------------------------------------------------------

def weak_augment(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    crop: int | tuple[int, int],
    scale: tuple[float, float] = (0.5, 2.0),
    flip_p: float = 0.5,
    *,
    generator: torch.Generator,
    ignore_index: int = IGNORE_INDEX,
    shard: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale, random crop (padding where the rescaled image is too small) and h-flip.

    ``images`` float [B, 3, H, W] in [0, 1] or uint8 [B, 3, H, W] (scaled to [0, 1]); ``labels``
    int [B, H, W] or None.

    Per sample: the image is rescaled by ``s ~ U(scale)``, a ``crop`` window is placed uniformly
    at random over it (when the rescaled image is smaller than the window, the image is placed
    uniformly inside the window instead) and the window is flipped with probability ``flip_p``.
    All of it is a single ``affine_grid`` + ``grid_sample``: bilinear for images, nearest for
    labels. Padding is 0 in the image.

    Returns ``(images, labels)``: images float [B, 3, h, w] (``(h, w)`` the crop; float32 from
    uint8), labels int64 [B, h, w] holding ``ignore_index`` on padding.
    With ``labels=None`` (unlabeled images) the second output is instead the padding mask, bool
    [B, h, w], True where a pixel lies outside the source image: methods must exclude those pixels
    from unsupervised losses (``~pad`` is the valid mask and can go through ``mix`` like labels).

    ``shard=(rank, world)``: ``images`` are this rank's part of a global batch of ``world`` equal
    parts. The random numbers of the whole global batch are drawn and this rank's slice is used,
    so every rank consumes the generator alike and the crops equal a single process's on the
    global batch (DDP parity).
    """
    if not images.is_floating_point():
        images = images.float() / 255.0
    b, _, h, w = images.shape
    ch, cw = _pair(crop)
    rank, world = shard
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"weak_augment: shard must be (rank, world) with 0 <= rank < world, got {shard}")
    u = _rand(generator, 4, b * world)[:, rank * b : (rank + 1) * b]
    s = scale[0] + (scale[1] - scale[0]) * u[0]
    # Offset of the window in the rescaled image; negative when the window is the larger one.
    spare_y, spare_x = h * s - ch, w * s - cw
    y0 = spare_y.clamp(max=0) + spare_y.abs() * u[1]
    x0 = spare_x.clamp(max=0) + spare_x.abs() * u[2]
    sign = torch.where(u[3] < flip_p, -1.0, 1.0)
    # Output pixel centre -> source position, both in affine_grid's normalised [-1, 1] units.
    zero = torch.zeros_like(s)
    theta = torch.stack([
        torch.stack([sign * cw / (w * s), zero, (2 * x0 + cw) / (w * s) - 1], dim=-1),
        torch.stack([zero, ch / (h * s), (2 * y0 + ch) / (h * s) - 1], dim=-1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, 1, ch, cw], align_corners=False)

    # Nearest sampling of (label + 1) with zero padding: 0 marks pixels outside the source.
    if labels is None:
        source = torch.ones(b, 1, h, w, device=images.device)
    else:
        source = (labels.to(torch.float32) + 1.0).unsqueeze(1)
    nearest = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=False).squeeze(1)
    inside = nearest > 0

    # Border padding keeps the last row/column crisp instead of blending it with black; the
    # padding itself is then zeroed with the same nearest test that defines the labels' padding.
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    out = out * inside.unsqueeze(1)
    if labels is None:
        return out, ~inside
    return out, torch.where(inside, nearest.long() - 1, ignore_index)


# -- photometric ---------------------------------------------------------------------------------

def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma float [..., 1, H, W] of RGB ``images`` float [..., 3, H, W] (same dtype)."""
    r, g, b = images.unbind(-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV along dim -3, all channels in [0, 1] (hue in turns): ``rgb`` float [..., 3, H, W]
    in [0, 1] -> float [..., 3, H, W], same dtype."""
    r, g, b = rgb.unbind(-3)
    maxc = rgb.amax(-3)
    delta = maxc - rgb.amin(-3)
    sat = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), 0.0)
    safe = torch.where(delta > 0, delta, 1.0)
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, torch.remainder(hue / 6.0, 1.0), 0.0)
    return torch.stack([hue, sat, maxc], dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB along dim -3 (hue in turns, any real value): ``hsv`` float [..., 3, H, W] ->
    float [..., 3, H, W], same dtype."""
    h, s, v = hsv.unbind(-3)
    h6 = h * 6.0

    def channel(n: float) -> torch.Tensor:
        # Piecewise-linear form of the sextant table: one expression per channel, no gathers.
        # The wrap is spelled out with floor (not remainder) so that only exactly rounded ops
        # run: the synthetic generator relies on batch-independent, bit-identical results.
        k = h6 + n
        k = k - 6.0 * (k / 6.0).floor()
        return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)

    return torch.stack([channel(5.0), channel(3.0), channel(1.0)], dim=-3)


def colour_jitter(
    images: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor | None,
) -> torch.Tensor:
    """torchvision's ColorJitter maths with per-sample factors float [B], in the fixed order
    brightness, contrast, saturation, hue (torchvision shuffles the order; we do not).
    ``images`` float [B, 3, H, W] in [0, 1] -> float [B, 3, H, W] in [0, 1].

    Hue is rotated in HSV space, as torchvision's ``adjust_hue`` does; ``hue=None`` skips the
    HSV round trip.
    """
    x = (images * _per_sample(brightness)).clamp(0.0, 1.0)
    c = _per_sample(contrast)
    x = (c * x + (1.0 - c) * grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)).clamp(0.0, 1.0)
    s = _per_sample(saturation)
    x = (s * x + (1.0 - s) * grayscale(x)).clamp(0.0, 1.0)
    if hue is not None:
        hsv = rgb_to_hsv(x)
        shifted = torch.remainder(hsv[:, 0] + hue.view(-1, 1, 1), 1.0)
        x = hsv_to_rgb(torch.stack([shifted, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0.0, 1.0)
    return x


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (``sigma`` float [B]) and a (2 radius + 1)
    kernel: ``images`` float [B, C, H, W] -> float [B, C, H, W], same dtype.

    Per-sample kernels run as one grouped convolution (one group per sample and channel);
    borders are replicated.
    """
    b, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma.to(images.dtype).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, K]
    size = 2 * radius + 1
    x = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(b * c, 1, size, 1), groups=b * c)
    x = F.conv2d(x, kernel.view(b * c, 1, 1, size), groups=b * c)
    return x.view(b, c, h, w)


def strong_augment(
    images: torch.Tensor,
    generator: torch.Generator,
    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
    jitter_p: float = 0.8,
    gray_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
) -> torch.Tensor:
    """UniMatch's strong view: ColorJitter(*jitter) w.p. ``jitter_p``, grayscale w.p. ``gray_p``,
    Gaussian blur (sigma ~ U(blur_sigma)) w.p. ``blur_p``, each coin per sample, in that order.

    Jitter factors follow torchvision: brightness, contrast and saturation ~ U(max(0, 1-j), 1+j),
    hue shift ~ U(-j, j) turns. The blur kernel spans 3 sigma of the largest sigma. Photometric
    only: the labels of the input stay valid. ``images`` float [B, 3, H, W] in [0, 1] -> float
    [B, 3, H, W] in [0, 1] of the input dtype.
    """
    dtype = images.dtype
    x = images.float()
    b = x.shape[0]
    u = _rand(generator, 8, b)
    factors = [max(0.0, 1.0 - j) + (1.0 + j - max(0.0, 1.0 - j)) * u[i] for i, j in enumerate(jitter[:3])]
    hue = jitter[3] * (2.0 * u[3] - 1.0) if jitter[3] > 0 else None
    x = torch.where(_per_sample(u[4] < jitter_p), colour_jitter(x, *factors, hue), x)
    x = torch.where(_per_sample(u[5] < gray_p), grayscale(x).expand_as(x), x)
    sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[6]
    radius = max(1, math.ceil(3.0 * blur_sigma[1]))
    x = torch.where(_per_sample(u[7] < blur_p), gaussian_blur(x, sigma, radius), x)
    return x.clamp(0.0, 1.0).to(dtype)


# -- mixing --------------------------------------------------------------------------------------

def mix(images_a: torch.Tensor, images_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``images_b`` where ``mask`` (bool [B, H, W]) is True, else ``images_a``; the mask broadcasts
    over any channel dimension, so images float [B, C, H, W] and per-pixel maps (any dtype)
    [B, H, W] use the same call. Returns the inputs' dtype and shape."""
    while mask.dim() < images_a.dim():
        mask = mask.unsqueeze(1)
    return torch.where(mask, images_b, images_a)


def mix_labels(labels_a: torch.Tensor, labels_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels int64 [B, H, W] (or float confidences, bool padding masks) mixed like the images by
    ``mask`` bool [B, H, W]: 255 moves with its pixel."""
    return torch.where(mask, labels_b, labels_a)


def cutmix_box(
    batch: int,
    height: int,
    width: int,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """UniMatch's CutMix box per sample: bool [B, H, W], all False where the coin (prob ``p``) says no.

    Box area ~ U(area) * H * W and aspect h/w ~ U(ratio), sides truncated to integers, position
    uniform among those where the box fits. UniMatch re-draws ratio and position until the box
    fits; drawing the ratio uniformly from the range that fits is the vectorised equivalent (the
    original's joint rejection slightly favours ratios near 1, which fit at more positions).
    """
    u = _rand(generator, 5, batch)
    box_area = (area[0] + (area[1] - area[0]) * u[0]) * (height * width)
    lo = torch.clamp(box_area / width**2, min=ratio[0])  # box width sqrt(a / r) <= W
    hi = torch.clamp(height**2 / box_area, max=ratio[1])  # box height sqrt(a r) <= H
    r = lo + (hi - lo).clamp(min=0) * u[1]
    box_w = (box_area / r).sqrt().floor().clamp(0, width)
    box_h = (box_area * r).sqrt().floor().clamp(0, height)
    return _box_mask(height, width, u[2], u[3], box_h, box_w, u[4] < p)


def _box_mask(height, width, uy, ux, box_h, box_w, on) -> torch.Tensor:
    """Bool [B, H, W] boxes of size (box_h, box_w) at uniform positions (uy, ux in [0, 1)) where ``on``."""
    y0 = ((height - box_h + 1) * uy).floor().view(-1, 1, 1)
    x0 = ((width - box_w + 1) * ux).floor().view(-1, 1, 1)
    ys = torch.arange(height, device=uy.device).view(1, -1, 1)
    xs = torch.arange(width, device=ux.device).view(1, 1, -1)
    inside = (ys >= y0) & (ys < y0 + box_h.view(-1, 1, 1)) & (xs >= x0) & (xs < x0 + box_w.view(-1, 1, 1))
    return inside & on.view(-1, 1, 1)


def classmix_mask(
    labels: torch.Tensor,
    generator: torch.Generator,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """ClassMix mask of ``labels`` int [B, H, W]: per sample, ceil(n/2) of its n present classes at
    random; bool [B, H, W], True on every pixel of a chosen class.

    ``ignore_index`` (and any label outside ``0..num_classes-1``) is never chosen and never masked.
    ``num_classes=None`` assumes labels below 256. Vectorised through a [B, C] selection table:
    random keys rank the present classes and the lowest ceil(n/2) ranks win.
    """
    b = labels.shape[0]
    c = 256 if num_classes is None else num_classes
    flat = labels.reshape(b, -1).long()
    known = (flat >= 0) & (flat < c) & (flat != ignore_index)
    column = torch.where(known, flat, c)  # column c collects the pixels that cannot be chosen
    present = torch.zeros(b, c + 1, dtype=torch.bool, device=labels.device).scatter_(1, column, True)[:, :c]
    keys = torch.where(present, _rand(generator, b, c), 2.0)  # absent classes sort last
    rank = keys.argsort(dim=1).argsort(dim=1)
    take = (present.sum(dim=1, keepdim=True) + 1) // 2
    chosen = present & (rank < take)
    table = torch.cat([chosen, torch.zeros(b, 1, dtype=torch.bool, device=labels.device)], dim=1)
    return table.gather(1, column).view(labels.shape)


def u2pl_cutmix_mask(
    batch: int, height: int, width: int, p: float = 0.5, *, generator: torch.Generator
) -> torch.Tensor:
    """U2PL's CutMix: one coin (prob ``p``) for the whole batch; if it lands, every sample gets a
    box of area ~HW/2 (width ~ U{int(W/2 + 1), W - 1}, height = round(HW / 2 / width)) filled from
    sample (i + 1) mod B. Bool [B, H, W], True inside the box; use with ``u2pl_cutmix``."""
    u = _rand(generator, 4, batch)
    coin = _rand(generator, 1)
    lo, hi = int(width / 2 + 1), max(int(width / 2 + 1), width - 1)
    box_w = (lo + ((hi - lo + 1) * u[0]).floor()).clamp(max=width)
    box_h = torch.round(height * width / 2 / box_w).clamp(max=height)
    return _box_mask(height, width, u[1], u[2], box_h, box_w, (coin < p).expand(batch))


def u2pl_cutmix(tensors: Sequence[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """Apply a ``u2pl_cutmix_mask`` (bool [B, H, W]) to images, labels, logits...: the box comes from
    sample (i + 1) mod B. Each of ``tensors`` (any dtype, [B, H, W] or [B, C, H, W]) keeps its shape."""
    return [mix(t, t.roll(-1, dims=0), mask) for t in tensors]
