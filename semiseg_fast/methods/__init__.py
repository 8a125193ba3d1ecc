"""Training methods, one file each; ``build_method`` looks them up by name."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .ctt import CTT
from .fixmatch import FixMatch
from .ipixmatch import IPixMatch
from .mllc import MLLC
from .options import Options, SemiSupervisedOptions
from .supervised import Supervised
from .u2pl import U2PL
from .unimatch import UniMatch

METHODS: dict[str, type[Method]] = {m.name: m for m in (Supervised, FixMatch, UniMatch, IPixMatch, U2PL, CTT, MLLC)}


#: every option class the config inherits: the shared semi-supervised options, then each method's
OPTION_CLASSES: tuple[type[Options], ...] = (SemiSupervisedOptions,) + tuple(
    dict.fromkeys(m.OPTIONS for m in METHODS.values() if m.OPTIONS is not None))

#: data sets of small generated scenes, which take the methods' CPU presets (``SYNTHETIC``)
GENERATED_SETS = ("synthetic", "fashion")


def method_defaults(name: str | None, data: str) -> dict:
    """Defaults of the method-dependent options: every method's paper values, the chosen method's
    model preset and, on the small generated sets (synthetic, fashion), its CPU preset."""
    out = {}
    for options in OPTION_CLASSES:
        out.update(options.paper_defaults())
    cls = METHODS.get(name, Method)
    out["arch"] = cls.ARCH
    if data in GENERATED_SETS:
        out.update(cls.SYNTHETIC)
    return out


def build_method(name: str, cfg, num_classes: int) -> Method:
    if name not in METHODS:
        raise ConfigError(f"--method: unknown method {name!r}; expected one of {sorted(METHODS)}")
    cfg.resolve_method_defaults()
    return METHODS[name](cfg, num_classes)


__all__ = ["METHODS", "OPTION_CLASSES", "Method", "Options", "build_method", "method_defaults"]
