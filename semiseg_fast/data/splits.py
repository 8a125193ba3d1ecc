"""Labeled / unlabeled partitions of a training set, reproducible from a seed."""
from __future__ import annotations

import math
import numbers
from fractions import Fraction

import torch

__all__ = ["labeled_count", "labeled_split", "parse_labeled"]


def labeled_count(num_images: int, labeled: float | int) -> int:
    """How many of ``num_images`` are labeled: a fraction in (0, 1] or a count in [1, N].

    A fraction is rounded half up and kept at >= 1 image, so 1/16 of 1000 is 63.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if isinstance(labeled, bool):
        raise ValueError(f"labeled must be a fraction in (0, 1] or a count in [1, {num_images}], got {labeled!r}")
    if isinstance(labeled, numbers.Integral):
        if not 1 <= labeled <= num_images:
            raise ValueError(f"labeled count must be in [1, {num_images}], got {labeled!r}")
        return int(labeled)
    if isinstance(labeled, numbers.Real):
        if not (math.isfinite(labeled) and 0 < labeled <= 1):
            raise ValueError(f"labeled fraction must be in (0, 1], got {labeled!r}")
        return min(num_images, max(1, math.floor(labeled * num_images + 0.5)))
    raise ValueError(f"labeled must be a fraction in (0, 1] or a count in [1, {num_images}], got {labeled!r}")


def labeled_split(num_images: int, labeled: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted labeled and unlabeled indices (int64, disjoint, together ``0..num_images-1``).

    The labeled set is a prefix of one seeded permutation, so with the same seed a smaller
    labeled set is always contained in a larger one (1/16 inside 1/8 inside 1/4 ...).
    """
    count = labeled_count(num_images, labeled)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(int(seed)))
    return order[:count].sort().values, order[count:].sort().values


def parse_labeled(text: str) -> float | int:
    """Command-line form of ``labeled``: "1/16" -> 0.0625, "0.25" -> 0.25, "92" -> 92.

    A plain integer is a count (so "1" is one image; write "1.0" or "1/1" for all of them).
    """
    raw = str(text).strip()
    try:
        if "/" in raw:
            num, den = (int(part) for part in raw.split("/"))
            value: float | int = float(Fraction(num, den))
        elif raw.lstrip("+").isdigit():
            value = int(raw)
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError):
        raise ValueError(
            f"labeled: expected a fraction like '1/16' or '0.25' or a count like '92', got {text!r}"
        ) from None
    if isinstance(value, int) and value < 1:
        raise ValueError(f"labeled: a count must be >= 1, got {text!r}")
    if isinstance(value, float) and not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"labeled: a fraction must be in (0, 1], got {text!r}")
    return value
