"""Loss and pseudo-label helpers shared by the methods (one place, no copies per method)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
