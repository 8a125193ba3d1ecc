"""Training methods, one file each; ``build_method`` looks them up by name."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .fixmatch import FixMatch
from .ipixmatch import IPixMatch
from .supervised import Supervised
from .unimatch import UniMatch

METHODS: dict[str, type[Method]] = {m.name: m for m in (Supervised, FixMatch, UniMatch, IPixMatch)}


def build_method(name: str, cfg, num_classes: int) -> Method:
    if name not in METHODS:
        raise ConfigError(f"--method: unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](cfg, num_classes)


__all__ = ["METHODS", "Method", "build_method"]
