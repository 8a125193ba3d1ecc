"""The training configuration: one flat dataclass, validated, dumped into every run directory.

It sits above everything else (only ``cli`` and ``train.py`` import it): ``TrainConfig``
inherits the sections of the run written here and the options classes that each method declares
in its own file (``methods.OPTION_CLASSES``), so the methods, the engine and the data read the
fields they need by attribute and never import this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .data import DATASETS
from .data.splits import parse_labeled
from .errors import ConfigError
from .methods import METHODS, OPTION_CLASSES, method_defaults
from .methods.options import require
from .models import MODELS


@dataclass
class Target:
    """What to train."""

    method: str = field(default="fixmatch", metadata={"help": "training method (the list is at the end of --help)"})
    data: str = field(default="synthetic", metadata={"help": "data set name (the list is at the end of --help)"})
    root: str | None = field(default=None, metadata={"help": "data set root folder (fashion: holds the 4 Fashion-MNIST .gz files, by default /usr/share/datasets/fashion-mnist; voc: the VOC2012 folder; cityscapes: the folder of leftImg8bit/ and gtFine/)"})
    labeled: str = field(default="1/16", metadata={"help": "labeled fraction ('1/16', '0.25') or count ('92')"})


@dataclass
class GeneratedData:
    """Generated scenes (synthetic, fashion)."""

    num_train: int = field(default=512, metadata={"help": "synthetic / fashion: training scenes (labeled + unlabeled)"})
    num_val: int = field(default=200, metadata={"help": "synthetic / fashion: validation scenes"})
    image_size: int = field(default=80, metadata={"help": "synthetic / fashion: generated image side length"})
    data_seed: int = field(default=0, metadata={"help": "the generated scenes and the labeled split derive from it"})
    cache_dir: str | None = field(default=".cache/semiseg_fast", metadata={"help": "where generated data is cached ('' = none)"})


@dataclass
class FileData:
    """Image files on disk (voc, cityscapes)."""

    protocol: str | None = field(default=None, metadata={"help": "voc: classic (labeled drawn from the 1464 train.txt images) | blended (from the 10582 train_aug pool) (default: blended when SegmentationClassAug exists, else classic)"})
    splits: str | None = field(default=None, metadata={"help": "voc / cityscapes: folder of labeled.txt (+ unlabeled.txt) image ids to train on instead of drawing a split (e.g. <out>/splits of an earlier run)"})
    num_workers: int | None = field(default=None, metadata={"help": "voc / cityscapes: data-loader worker processes per stream (default min(4, CPUs); 0 = in the main process)"})
    eval_window: int | None = field(default=None, metadata={"help": "voc / cityscapes: sliding-window side for validation, 0 = whole images (default: 0 on voc, --crop on cityscapes, as UniMatch)"})
    eval_stride: int | None = field(default=None, metadata={"help": "voc / cityscapes: sliding-window stride (default: 2/3 of the window, as UniMatch)"})


@dataclass
class ModelOptions:
    """Model."""

    arch: str | None = field(default=None, metadata={"help": "deeplabv3plus | deeplabv3plus_u2pl | deeplabv2 (default: the method's)"})
    backbone: str = field(default="resnet18", metadata={"help": "resnet18 | resnet50 | resnet101"})
    output_stride: int | None = field(default=None, metadata={"help": "backbone output stride 8 | 16 (default: the arch's, 16 for deeplabv3plus, 8 otherwise)"})
    deep_stem: bool = field(default=False, metadata={"help": "3-conv deep stem (U2PL / UniMatch backbones)"})
    pretrained: str | None = field(default=None, metadata={"help": "local torchvision-named ResNet weights file"})


@dataclass
class OptimOptions:
    """Optimisation."""

    crop: int = field(default=64, metadata={"help": "training crop side length"})
    batch_size: int = field(default=8, metadata={"help": "labeled images per step"})
    unlabeled_batch_size: int | None = field(default=None, metadata={"help": "unlabeled images per step (default: batch_size)"})
    iters: int = field(default=400, metadata={"help": "training iterations"})
    lr: float = field(default=0.02, metadata={"help": "base learning rate (backbone)"})
    head_lr_mult: float = field(default=1.0, metadata={"help": "learning-rate multiplier of the head (10 with a pretrained backbone)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    lr_power: float = field(default=0.9, metadata={"help": "poly schedule power"})


@dataclass
class RunOptions:
    """Running."""

    seed: int = field(default=0, metadata={"help": "seed of the model init, augmentations and data order"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (bit-exact resume on CPU)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA) | bf16 | off"})
    compile: str = field(default="auto", metadata={"help": "torch.compile the step: auto (on for CUDA) | on | off"})
    eval_every: int = field(default=200, metadata={"help": "evaluate every N iterations (0: only at the end)"})
    eval_batch_size: int = field(default=32, metadata={"help": "validation batch size"})
    log_every: int = field(default=10, metadata={"help": "log and check for NaN every N iterations"})
    ckpt_every: int = field(default=100, metadata={"help": "write latest.pt every N iterations (0: at eval and end only)"})
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<method>-<data>)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its latest.pt (an error when there is none)"})
    overwrite: bool = field(default=False, metadata={"help": "start again in an --out that holds a run, deleting its checkpoints, metrics and logs"})
    change_schedule: bool = field(default=False, metadata={"help": "with --resume: continue with a changed --iters, --lr, batch size or crop instead of refusing them"})
    log_backend: str = field(default="auto", metadata={"help": "auto (TensorBoard if installed, else CSV) | tensorboard | csv"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


#: the sections of the configuration in --help order: the run's own, then every method's options
SECTIONS = (Target, GeneratedData, FileData, ModelOptions, OptimOptions, *OPTION_CLASSES, RunOptions)


@dataclass
class TrainConfig(*reversed(SECTIONS)):  # dataclass fields come base-last first: reversed keeps SECTIONS' order
    """The flat configuration of one run: every field is a ``--flag`` of ``train.py``."""

    def __post_init__(self) -> None:
        if self.unlabeled_batch_size is None:
            self.unlabeled_batch_size = self.batch_size
        if self.out is None:
            self.out = f"runs/{self.method}-{self.data}"

    def validate(self) -> "TrainConfig":
        def need(cond: bool, name: str, what: str) -> None:
            require(self, cond, name, what)

        need(self.method in METHODS, "method", f"expected one of {sorted(METHODS)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                need(math.isfinite(value), f.name, "expected a finite number")
        need(self.data in DATASETS, "data", f"expected one of {sorted(DATASETS)}")
        self.resolve_method_defaults()
        need(self.arch in MODELS, "arch", f"expected one of {list(MODELS)}")
        for options in OPTION_CLASSES:
            options.check(self)
        for name in ("num_train", "num_val", "image_size", "crop", "batch_size", "unlabeled_batch_size", "iters",
                     "eval_batch_size", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "expected an integer >= 1")
        for name in ("eval_every", "ckpt_every"):
            need(getattr(self, name) >= 0, name, "expected an integer >= 0")
        need(self.output_stride in (None, 8, 16, 32), "output_stride", "expected 8, 16 or 32")
        need(self.protocol in (None, "classic", "blended"), "protocol", "expected classic or blended")
        need(self.protocol is None or self.data == "voc", "protocol", "only voc has protocols")
        need(not self.splits or self.data in ("voc", "cityscapes"), "splits", "only voc and cityscapes read split files")
        need(self.num_workers is None or (isinstance(self.num_workers, int) and self.num_workers >= 0), "num_workers",
             "expected an integer >= 0")
        need(self.eval_window is None or (isinstance(self.eval_window, int) and self.eval_window >= 0), "eval_window",
             "expected an integer >= 0 (0 = whole images)")
        need(self.eval_stride is None or (isinstance(self.eval_stride, int) and self.eval_stride >= 1), "eval_stride",
             "expected an integer >= 1")
        window = self.crop if self.eval_window is None and self.data == "cityscapes" else self.eval_window
        need(self.eval_stride is None or not window or self.eval_stride <= window, "eval_stride",
             f"expected at most the eval window ({window})")
        for name in ("lr", "head_lr_mult", "lr_power"):
            need(getattr(self, name) > 0, name, "expected a positive number")
        need(0.0 <= self.momentum <= 1.0, "momentum", "expected a number in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "expected a number >= 0")
        need(self.amp in ("auto", "bf16", "off"), "amp", "expected auto, bf16 or off")
        need(self.compile in ("auto", "on", "off"), "compile", "expected auto, on or off")
        need(self.log_backend in ("auto", "tensorboard", "csv"), "log_backend", "expected auto, tensorboard or csv")
        need(not (self.resume and self.overwrite), "overwrite", "--resume continues a run, --overwrite deletes it: use one")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "expected auto, cpu, cuda or cuda:N")
        try:
            parse_labeled(self.labeled)
        except ValueError as e:
            raise ConfigError(f"--labeled: {e}") from None
        return self

    def resolve_method_defaults(self) -> "TrainConfig":
        """Fill every option left at None with the method's default for this data set.

        Each method's options class carries its paper values and the method class a small
        CPU-friendly preset for the generated sets (``Method.SYNTHETIC``); options of other
        methods take their paper values, so ``config.json`` always shows concrete numbers.
        """
        values = method_defaults(self.method if self.method in METHODS else None, self.data)
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def finite_float(text: str) -> float:
    """argparse type of every float option: nan and inf are refused where they are typed."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _arg_type(f: dataclasses.Field):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return finite_float
    return str


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default said once: the paper value of a method option (and the
    generated sets' preset where one differs), the plain default otherwise; a help text that
    already explains its default keeps its own words."""
    text = f.metadata["help"]
    if "default" in text:
        return text
    if "paper" not in f.metadata:
        return f"{text} (default: {'none' if f.default is None else f.default})"
    presets = sorted({str(m.SYNTHETIC[f.name]) for m in METHODS.values() if f.name in m.SYNTHETIC})
    preset = f"; {', '.join(presets)} on the generated sets" if presets else ""
    return f"{text} (default: {f.metadata['paper']:g}{preset})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a semi-supervised segmentation method. With no arguments: FixMatch on the "
        "built-in synthetic data set with 1/16 of the labels, on the CPU in a few minutes.",
        epilog=f"methods: {', '.join(sorted(METHODS))}; data sets: {', '.join(sorted(DATASETS))}",
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=_help(f))
        else:
            parser.add_argument(flag, type=_arg_type(f), default=f.default, help=_help(f))
    # read by the command line (cli.py) before parsing; listed here so that --help shows it
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("debug")
    cfg = TrainConfig(**args)
    if cfg.cache_dir == "":
        cfg.cache_dir = None
    return cfg.validate()
