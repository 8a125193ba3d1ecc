"""Options of the methods: each method file declares its own dataclass, the config collects them.

A field is a flat command-line option (``u2pl_queue`` is ``--u2pl-queue``) whose metadata carries
its help, its paper value (``paper``: the default when the option is left at None; a method's
``SYNTHETIC`` preset may replace it on the generated sets) and its range check. The config
(``semiseg_fast.config.TrainConfig``) inherits every options class, so nothing here or in the
methods imports the config: a method only reads the fields it declared.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

#: (predicate, what is expected): the checks an option may carry
Check = tuple[Callable[[Any], bool], str]
INT_AT_LEAST_1: Check = (lambda v: isinstance(v, int) and v >= 1, "expected an integer >= 1")
FRACTION: Check = (lambda v: 0.0 <= v <= 1.0, "expected a number in [0, 1]")
NON_NEGATIVE: Check = (lambda v: v >= 0, "expected a number >= 0")
POSITIVE: Check = (lambda v: v > 0, "expected a positive number")


def one_of(*values) -> Check:
    return (lambda v: v in values, "expected " + " or ".join(str(v) for v in values))


def option(help: str, *, default: Any = None, paper: Any = None, check: Check | None = None):
    """A dataclass field for one option; ``paper`` is the value a None default resolves to."""
    metadata: dict[str, Any] = {"help": help}
    if paper is not None:
        metadata["paper"] = paper
    if check is not None:
        metadata["check"] = check
    return field(default=default, metadata=metadata)


def require(cfg, ok: bool, name: str, what: str) -> None:
    """Raise the one-line error of a bad option: ``--name: what, got value``."""
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')}: {what}, got {getattr(cfg, name)!r}")


class Options:
    """Base of the options dataclasses: ``check`` applies the range checks of the class's own fields."""

    @classmethod
    def paper_defaults(cls) -> dict[str, Any]:
        return {f.name: f.metadata["paper"] for f in _own_fields(cls) if "paper" in f.metadata}

    @classmethod
    def check(cls, cfg) -> None:
        for f in _own_fields(cls):
            if "check" in f.metadata:
                ok, what = f.metadata["check"]
                require(cfg, ok(getattr(cfg, f.name)), f.name, what)


def _own_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]


@dataclass
class SemiSupervisedOptions(Options):
    """What every semi-supervised method reads: the confidence rule, the teacher, the loss weight."""

    conf_thresh: float = option("pseudo-label confidence threshold", default=0.95, check=FRACTION)
    ema_decay: float = option("largest EMA decay of mean teachers", default=0.99, check=FRACTION)
    unsup_weight: float = option("weight of the unsupervised loss", default=1.0, check=NON_NEGATIVE)
