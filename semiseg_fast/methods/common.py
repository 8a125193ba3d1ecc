"""Loss and pseudo-label helpers shared by the methods (one place, no copies per method)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.augment import cutmix_box, mix, strong_augment

IGNORE = 255


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``logits`` float [B, C, h, w] -> float32 [B, C, *size]: bilinear, align_corners=True (what every
    seed method does before its losses)."""
    logits = logits.float()
    if logits.shape[-2:] == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def supervised_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``logits`` float [B, C, H, W] (or [N, C]) against ``labels`` int64 [B, H, W] (or [N])
    over non-ignored pixels: float32 []; 0 (not NaN) when every pixel is ignored."""
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    return per_pixel.sum() / (labels != IGNORE).sum().clamp(min=1)


@torch.no_grad()
def pseudo_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence float32 [B, H, W] and arg-max class int64 [B, H, W] of the channel softmax of
    ``logits`` float [B, C, H, W]."""
    return logits.float().softmax(1).max(1)


def confident_ce(
    logits: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, thresh: float, valid: torch.Tensor
) -> torch.Tensor:
    """UniMatch's unsupervised CE: sum over confident valid pixels / number of valid pixels, float32 [].

    ``logits`` float [B, C, H, W], ``target`` int64 [B, H, W], ``conf`` float [B, H, W], ``valid``
    bool [B, H, W]."""
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    keep = (conf >= thresh) & valid
    return (per_pixel * keep).sum() / valid.sum().clamp(min=1)


def downsample_nearest(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels or masks [B, H, W] (any dtype) on a coarser grid with PyTorch's legacy ``nearest``
    (src = floor(dst * in / out)), as U2PL, CTT and MLLC do; dtype is kept (255 survives)."""
    if maps.shape[-2:] == tuple(size):
        return maps
    out = F.interpolate(maps.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    return out.to(maps.dtype)


def to_rows(maps: torch.Tensor) -> torch.Tensor:
    """Feature maps [B, D, h, w] as pixel rows [B*h*w, D], any dtype (the layout of the contrastive ops)."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def confident_fraction(conf: torch.Tensor, thresh: float, valid: torch.Tensor) -> torch.Tensor:
    """CTT/MLLC's pseudo-label weight, float32 []: the fraction of valid pixels (``valid`` bool
    [B, H, W]) whose confidence (``conf`` float [B, H, W]) >= thresh."""
    return ((conf >= thresh) & valid).sum() / valid.sum().clamp(min=1)


def strong_cutmix_view(x_u: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch-style strong view of ``x_u`` float [B, 3, H, W]: photometric jitter, grayscale and
    blur, then CutMix with the next image of the batch (no extra batch needed). Returns (view float
    [B, 3, H, W], box bool [B, H, W]); targets follow with ``mix(t, t.roll(1, 0), box)``."""
    b, _, h, w = x_u.shape
    box = cutmix_box(b, h, w, p=0.5, generator=generator)
    x_s = strong_augment(x_u, generator=generator)
    return mix(x_s, x_s.roll(1, 0), box), box
