"""Loss and pseudo-label helpers shared by the methods (one place, no copies per method)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.augment import cutmix_box, mix, strong_augment

IGNORE = 255


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True, in fp32 (what every seed method does before its losses)."""
    logits = logits.float()
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def supervised_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over non-ignored pixels; 0 (not NaN) when every pixel is ignored."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    return per_pixel.sum() / (labels != IGNORE).sum().clamp(min=1)


@torch.no_grad()
def pseudo_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and arg-max class of the channel softmax."""
    return logits.float().softmax(1).max(1)


def confident_ce(
    logits: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, thresh: float, valid: torch.Tensor
) -> torch.Tensor:
    """UniMatch's unsupervised CE: sum over confident valid pixels / number of valid pixels."""
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    keep = (conf >= thresh) & valid
    return (per_pixel * keep).sum() / valid.sum().clamp(min=1)


def downsample_nearest(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels or masks [B, H, W] on a coarser grid with PyTorch's legacy ``nearest``
    (src = floor(dst * in / out)), as U2PL, CTT and MLLC do; dtype is kept (255 survives)."""
    if maps.shape[-2:] == tuple(size):
        return maps
    out = F.interpolate(maps.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    return out.to(maps.dtype)


def to_rows(maps: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] feature maps as [B*h*w, D] pixel rows (the layout of the contrastive ops)."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def confident_fraction(conf: torch.Tensor, thresh: float, valid: torch.Tensor) -> torch.Tensor:
    """CTT/MLLC's pseudo-label weight: the fraction of valid pixels whose confidence >= thresh."""
    return ((conf >= thresh) & valid).sum() / valid.sum().clamp(min=1)


def strong_cutmix_view(x_u: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch-style strong view: photometric jitter, grayscale and blur, then CutMix with the next
    image of the batch (no extra batch needed). Returns (view, box); targets follow with
    ``mix(t, t.roll(1, 0), box)``."""
    b, _, h, w = x_u.shape
    box = cutmix_box(b, h, w, p=0.5, generator=generator)
    x_s = strong_augment(x_u, generator=generator)
    return mix(x_s, x_s.roll(1, 0), box), box
