"""The training configuration: one flat dataclass, validated, dumped into every run directory."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError


@dataclass
class TrainConfig:
    # what to train
    method: str = field(default="fixmatch", metadata={"help": "training method (the list is at the end of --help)"})
    data: str = field(default="synthetic", metadata={"help": "data set name (the list is at the end of --help)"})
    root: str | None = field(default=None, metadata={"help": "data set root folder (fashion: holds the 4 Fashion-MNIST .gz files; None = /usr/share/datasets/fashion-mnist; voc: the VOC2012 folder; cityscapes: the folder of leftImg8bit/ and gtFine/)"})
    labeled: str = field(default="1/16", metadata={"help": "labeled fraction ('1/16', '0.25') or count ('92')"})
    # generated scenes (synthetic, fashion)
    num_train: int = field(default=512, metadata={"help": "synthetic / fashion: training scenes (labeled + unlabeled)"})
    num_val: int = field(default=200, metadata={"help": "synthetic / fashion: validation scenes"})
    image_size: int = field(default=80, metadata={"help": "synthetic / fashion: generated image side length"})
    data_seed: int = field(default=0, metadata={"help": "the generated scenes and the labeled split derive from it"})
    cache_dir: str | None = field(default=".cache/semiseg_fast", metadata={"help": "where generated data is cached ('' = none)"})
    # image files on disk (voc, cityscapes)
    protocol: str | None = field(default=None, metadata={"help": "voc: classic (labeled drawn from the 1464 train.txt images) | blended (from the 10582 train_aug pool) (default: blended when SegmentationClassAug exists, else classic)"})
    splits: str | None = field(default=None, metadata={"help": "voc / cityscapes: folder of labeled.txt (+ unlabeled.txt) image ids to train on instead of drawing a split (e.g. <out>/splits of an earlier run)"})
    num_workers: int | None = field(default=None, metadata={"help": "voc / cityscapes: data-loader worker processes per stream (default min(4, CPUs); 0 = in the main process)"})
    eval_window: int | None = field(default=None, metadata={"help": "voc / cityscapes: sliding-window side for validation, 0 = whole images (default: 0 on voc, --crop on cityscapes, as UniMatch)"})
    eval_stride: int | None = field(default=None, metadata={"help": "voc / cityscapes: sliding-window stride (default: 2/3 of the window, as UniMatch)"})
    # model
    arch: str | None = field(default=None, metadata={"help": "deeplabv3plus | deeplabv3plus_u2pl | deeplabv2 (default: the method's)"})
    backbone: str = field(default="resnet18", metadata={"help": "resnet18 | resnet50 | resnet101"})
    output_stride: int | None = field(default=None, metadata={"help": "backbone output stride 8 | 16 (default: the arch's, 16 for deeplabv3plus, 8 otherwise)"})
    deep_stem: bool = field(default=False, metadata={"help": "3-conv deep stem (U2PL / UniMatch backbones)"})
    pretrained: str | None = field(default=None, metadata={"help": "local torchvision-named ResNet weights file"})
    # optimisation
    crop: int = field(default=64, metadata={"help": "training crop side length"})
    batch_size: int = field(default=8, metadata={"help": "labeled images per step"})
    unlabeled_batch_size: int | None = field(default=None, metadata={"help": "unlabeled images per step (default: batch_size)"})
    iters: int = field(default=400, metadata={"help": "training iterations"})
    lr: float = field(default=0.02, metadata={"help": "base learning rate (backbone)"})
    head_lr_mult: float = field(default=1.0, metadata={"help": "learning-rate multiplier of the head (10 with a pretrained backbone)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    lr_power: float = field(default=0.9, metadata={"help": "poly schedule power"})
    # semi-supervised
    conf_thresh: float = field(default=0.95, metadata={"help": "pseudo-label confidence threshold"})
    ema_decay: float = field(default=0.99, metadata={"help": "largest EMA decay of mean teachers"})
    unsup_weight: float = field(default=1.0, metadata={"help": "weight of the unsupervised loss"})
    # IPixMatch
    ipix_weight: float = field(default=1.0, metadata={"help": "ipixmatch: weight alpha of the spatial KL term"})
    ipix_warmup: float = field(default=0.0625, metadata={"help": "ipixmatch: fraction of the run over which alpha ramps up"})
    ipix_temperature: float = field(default=4.0, metadata={"help": "ipixmatch: softmax temperature over pixels"})
    ipix_tau: float = field(default=0.8, metadata={"help": "ipixmatch: teacher confidence for the pixel set Omega"})
    # U2PL (None = the method's default for the data set: the paper's, or the synthetic preset)
    u2pl_contrast_weight: float | None = field(default=None, metadata={"help": "u2pl: weight of the contrastive loss (paper 0.1; official code 1)"})
    u2pl_queue: int | None = field(default=None, metadata={"help": "u2pl: negative queue length per class (paper 30000)"})
    u2pl_queue_bg: int | None = field(default=None, metadata={"help": "u2pl: negative queue length of class 0 (paper 50000)"})
    u2pl_sup_only: float | None = field(default=None, metadata={"help": "u2pl: fraction of the run trained supervised only (paper 1 of 80 epochs)"})
    u2pl_official_q1: bool = field(default=False, metadata={"help": "u2pl: reproduce official bug Q1 (negatives of class V[i] for anchors of class i)"})
    u2pl_official_q2: bool = field(default=False, metadata={"help": "u2pl: reproduce official bug Q2 (negatives must carry the class's own label)"})
    # CTT
    ctt_pairs: int | None = field(default=None, metadata={"help": "ctt: student-teacher pairs (2 or 3)"})
    ctt_bank: int | None = field(default=None, metadata={"help": "ctt: memory bank entries per class (paper code 256)"})
    ctt_gamma: float | None = field(default=None, metadata={"help": "ctt: cross-teacher confidence splitting HC from LC anchors"})
    ctt_hc_weight: float | None = field(default=None, metadata={"help": "ctt: weight of the high-confidence contrast (paper's value lost; ours)"})
    ctt_lc_weight: float | None = field(default=None, metadata={"help": "ctt: weight of the low-confidence contrast (paper's value lost; ours)"})
    ctt_directional: bool = field(default=True, metadata={"help": "ctt: LC only where the peer student is more confident (paper); off = v2 script"})
    # MLLC
    mllc_rounds: int | None = field(default=None, metadata={"help": "mllc: graph rounds K"})
    mllc_official_mask: bool = field(default=False, metadata={"help": "mllc: the official scrambled class-graph mask instead of label equality"})
    mllc_batch_graph: bool = field(default=False, metadata={"help": "mllc: one graph over all pixels of the batch (inter-image) instead of one per image"})
    mllc_proto_weight: float | None = field(default=None, metadata={"help": "mllc: weight of the prototype (inter-image SLG) loss"})
    mllc_proto_start: float | None = field(default=None, metadata={"help": "mllc: fraction of the run before the prototype loss starts"})
    mllc_affinity_weight: float | None = field(default=None, metadata={"help": "mllc: weight of the intra-image affinity BCE (commented out in the code; 0 = official)"})
    # running
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
    resume: bool = field(default=False, metadata={"help": "resume from <out>/latest.pt when it exists"})
    log_backend: str = field(default="auto", metadata={"help": "auto (TensorBoard if installed, else CSV) | tensorboard | csv"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.unlabeled_batch_size is None:
            self.unlabeled_batch_size = self.batch_size
        if self.out is None:
            self.out = f"runs/{self.method}-{self.data}"

    def validate(self) -> "TrainConfig":
        from .data import DATASETS
        from .methods import METHODS

        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"--{name.replace('_', '-')}: {what}, got {getattr(self, name)!r}")

        need(self.method in METHODS, "method", f"expected one of {sorted(METHODS)}")
        need(self.data in DATASETS, "data", f"expected one of {sorted(DATASETS)}")
        self.resolve_method_defaults()
        from .models import MODELS

        need(self.arch in MODELS, "arch", f"expected one of {list(MODELS)}")
        for name in ("u2pl_queue", "u2pl_queue_bg", "ctt_bank", "mllc_rounds"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "expected an integer >= 1")
        need(self.ctt_pairs in (2, 3), "ctt_pairs", "expected 2 or 3")
        for name in ("u2pl_sup_only", "ctt_gamma", "mllc_proto_start"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "expected a number in [0, 1]")
        for name in ("u2pl_contrast_weight", "ctt_hc_weight", "ctt_lc_weight", "mllc_proto_weight", "mllc_affinity_weight"):
            need(getattr(self, name) >= 0, name, "expected a number >= 0")
        for name in ("num_train", "num_val", "image_size", "crop", "batch_size", "unlabeled_batch_size", "iters",
                     "eval_batch_size", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "expected an integer >= 1")
        for name in ("eval_every", "ckpt_every"):
            need(getattr(self, name) >= 0, name, "expected an integer >= 0")
        need(self.output_stride in (None, 8, 16, 32), "output_stride", "expected 8, 16 or 32")
        need(not (self.mllc_batch_graph and self.mllc_official_mask), "mllc_batch_graph",
             "the official class-graph layout (--mllc-official-mask) is per image; use one of the two")
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
        for name in ("momentum", "conf_thresh", "ema_decay", "ipix_warmup", "ipix_tau"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "expected a number in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", "expected a number >= 0")
        need(self.unsup_weight >= 0, "unsup_weight", "expected a number >= 0")
        need(self.ipix_weight >= 0, "ipix_weight", "expected a number >= 0")
        need(self.ipix_temperature > 0, "ipix_temperature", "expected a positive number")
        need(self.amp in ("auto", "bf16", "off"), "amp", "expected auto, bf16 or off")
        need(self.compile in ("auto", "on", "off"), "compile", "expected auto, on or off")
        need(self.log_backend in ("auto", "tensorboard", "csv"), "log_backend", "expected auto, tensorboard or csv")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "expected auto, cpu, cuda or cuda:N")
        from .data.splits import parse_labeled

        try:
            parse_labeled(self.labeled)
        except ValueError as e:
            raise ConfigError(f"--labeled: {e}") from None
        return self

    def resolve_method_defaults(self) -> "TrainConfig":
        """Fill every option left at None with the method's default for this data set.

        Each method class lists its paper values and a small CPU-friendly preset for the
        synthetic set (``Method.defaults``); options of other methods take their paper values,
        so ``config.json`` always shows concrete numbers.
        """
        from .methods import METHODS, method_defaults

        values = method_defaults(self.method if self.method in METHODS else None, self.data)
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _arg_type(f: dataclasses.Field):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .methods import METHODS

    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a semi-supervised segmentation method. With no arguments: FixMatch on the "
        "built-in synthetic data set with 1/16 of the labels, on the CPU in a few minutes.",
        epilog=f"methods: {', '.join(sorted(METHODS))}; data sets: {', '.join(sorted(DATASETS))}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=_arg_type(f), default=f.default, help=f.metadata["help"])
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    if cfg.cache_dir == "":
        cfg.cache_dir = None
    return cfg.validate()
