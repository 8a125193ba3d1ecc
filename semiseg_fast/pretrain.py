"""Offline classification pretraining of a ResNet backbone: the stand-in for ImageNet weights.

    python -m semiseg_fast.pretrain --data fashion --arch resnet18 --out weights/fashion_r18.pt
    python train.py --data fashion --pretrained weights/fashion_r18.pt ...

No pretrained weights can be downloaded here, so they are made. The backbone learns to classify
object crops cut from scenes that the segmentation runs never see:

- ``fashion``: single garments of the ``train`` files drawn as the scenes draw them (tinted, over
  a scene background, ``data.fashion.render_garment_crops``), from the stream indices
  ``PRETRAIN_OFFSET + i``. The validation scenes use only ``t10k`` garments, so nothing of
  validation is seen, as ImageNet pretraining sees nothing of VOC's validation set. The held-out
  accuracy is measured on ``t10k`` garments.
- ``synthetic``: object crops of the scenes of generator indices ``PRETRAIN_OFFSET + i``
  (training scenes are ``0..``, validation ``1 << 40 ..``), held out:
  ``PRETRAIN_OFFSET + HELD_OUT_OFFSET + i``. A crop is the square around the pixels of one class of
  a scene (its bounding box, enlarged by ``MARGIN``); its target is that class.

Each epoch every sample is jittered in scale and position and flipped at random, and resampled to
``--crop`` pixels. The trunk is the torchvision-layout ResNet of the
segmentation models at output stride 32 with global average pooling and a linear classifier
``fc``; the input is normalised with the ImageNet statistics as the segmentation models do. The
file written holds ``{"state_dict": torchvision-named tensors (fc included, which --pretrained
ignores), "meta": {...}}`` and a ``.json`` beside it with the same ``meta`` (accuracy, time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .errors import ConfigError, DataError
from .fileio import atomic_write_text
from .models import BACKBONES, ResNet
from .models.deeplabv3plus import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PretrainConfig", "object_boxes", "pretrain", "main"]

#: scene stream indices of the pretraining scenes: disjoint from train (0..) and val (1 << 40 ..)
PRETRAIN_OFFSET = 1 << 41
#: held-out scenes of the synthetic set, after the pretraining scenes
HELD_OUT_OFFSET = 1 << 39
#: a class needs this many pixels in a scene to give a crop (smaller ones are slivers behind others)
MIN_PIXELS = 40
#: the crop's side is the box's longer side times this
MARGIN = 1.25


#: the defaults that differ between the data sets: fashion samples are single garments of 22-36 px
#: on 40 px images (scenes show them at 24-48 px), synthetic samples are object crops of scenes
PER_DATA = {"fashion": {"scenes": 12000, "held_out": 2000, "image_size": 40, "epochs": 4},
            "synthetic": {"scenes": 4000, "held_out": 500, "image_size": 80, "epochs": 5}}


@dataclass
class PretrainConfig:
    data: str = "fashion"
    arch: str = "resnet18"
    out: str = "weights/fashion_r18.pt"
    root: str = ""
    scenes: int | None = None  # None: the data set's value in PER_DATA
    held_out: int | None = None
    image_size: int | None = None
    crop: int = 40
    #: fashion: a garment's side as fractions of the image, drawn uniformly
    garment_side: tuple[float, float] = (0.55, 0.9)
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 0
    overwrite: bool = False
    progress: bool = True

    def check(self) -> "PretrainConfig":
        if self.data not in PER_DATA:
            raise ConfigError(f"--data: pretraining knows {sorted(PER_DATA)}, got {self.data!r}")
        for name, value in PER_DATA[self.data].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.arch not in BACKBONES:
            raise ConfigError(f"--arch: expected one of {BACKBONES}, got {self.arch!r}")
        for name in ("scenes", "held_out", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16 or self.crop < 16:
            raise ConfigError(f"--image-size and --crop must be >= 16, got {self.image_size} and {self.crop}")
        lo, hi = (float(v) for v in self.garment_side)
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"--garment-side: expected 0 < LO <= HI <= 1, got {lo} {hi}")
        self.garment_side = (lo, hi)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr: must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay: must be >= 0, got {self.weight_decay}")
        if self.threads < 0:
            raise ConfigError(f"--threads: must be >= 0 (0 = torch's default), got {self.threads}")
        if Path(self.out).exists() and not self.overwrite:
            raise ConfigError(f"--out: {self.out} exists; pass --overwrite to replace it")
        return self


# -- samples ------------------------------------------------------------------------------------

def object_boxes(labels: torch.Tensor, num_classes: int, min_pixels: int = MIN_PIXELS) -> torch.Tensor:
    """One row per (scene, foreground class with at least ``min_pixels`` pixels) of ``labels``
    uint8 [N, H, W]: int64 [M, 6] = (scene, class, top, left, bottom, right), the box inclusive."""
    rows = []
    n, h, w = labels.shape
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    for c in range(1, num_classes):
        mask = labels == c
        count = mask.flatten(1).sum(1)
        keep = (count >= min_pixels).nonzero().flatten()
        if keep.numel() == 0:
            continue
        m = mask[keep]
        big = max(h, w)
        top = torch.where(m, ys, big).flatten(1).amin(1)
        bottom = torch.where(m, ys, -1).flatten(1).amax(1)
        left = torch.where(m, xs, big).flatten(1).amin(1)
        right = torch.where(m, xs, -1).flatten(1).amax(1)
        rows.append(torch.stack((keep, torch.full_like(keep, c), top, left, bottom, right), 1))
    if not rows:
        return torch.zeros(0, 6, dtype=torch.long)
    return torch.cat(rows)


def _samples(cfg: PretrainConfig, held_out: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images uint8 [N, 3, S, S], their ``object_boxes`` rows int64 [M, 6] and the class names
    (background first)."""
    count = cfg.held_out if held_out else cfg.scenes
    if cfg.data == "fashion":
        from .data.fashion import CLASS_NAMES, load_garments, render_garment_crops

        garments = load_garments("val" if held_out else "train", cfg.root or None)
        indices = range(PRETRAIN_OFFSET, PRETRAIN_OFFSET + count)
        images, labels = render_garment_crops(garments, cfg.seed, indices, cfg.image_size, side=cfg.garment_side)
        # the whole image is the sample: a box that MARGIN enlarges to the image
        s = cfg.image_size
        inner = round(s / MARGIN)
        lo = (s - inner) // 2
        box = torch.tensor([lo, lo, lo + inner - 1, lo + inner - 1]).expand(count, 4)
        return images, torch.cat((torch.arange(count).unsqueeze(1), labels.unsqueeze(1) + 1, box), 1), CLASS_NAMES
    from .data.synthetic import CLASS_NAMES, generate_scenes

    start = PRETRAIN_OFFSET + (HELD_OUT_OFFSET if held_out else 0)
    progress = ("held-out" if held_out else "pretraining") if cfg.progress else None
    images, labels = generate_scenes(cfg.seed, range(start, start + count), cfg.image_size, progress=progress)
    return images, object_boxes(labels, len(CLASS_NAMES)), CLASS_NAMES


def crops(images: torch.Tensor, boxes: torch.Tensor, size: int, generator: torch.Generator | None = None
          ) -> torch.Tensor:
    """Square crops float [M, 3, size, size] in [0, 1] around ``boxes`` int64 [M, 6] of ``images``
    uint8 [N, 3, H, W]; with a ``generator``, jittered (scale 0.85-1.2, shift up to 1/8 of the side,
    horizontal flip), else centred. Outside the image the edge pixels repeat."""
    m = boxes.shape[0]
    h, w = images.shape[-2:]
    top, left, bottom, right = boxes[:, 2:].double().unbind(1)
    cy, cx = (top + bottom + 1) / 2, (left + right + 1) / 2
    side = torch.maximum(bottom - top + 1, right - left + 1) * MARGIN
    flip = torch.ones(m, dtype=torch.float64)
    if generator is not None:
        u = torch.rand(m, 4, generator=generator, dtype=torch.float64)
        side = side * (0.85 + 0.35 * u[:, 0])
        cy = cy + (u[:, 1] - 0.5) * side / 4
        cx = cx + (u[:, 2] - 0.5) * side / 4
        flip = torch.where(u[:, 3] < 0.5, -1.0, 1.0)
    theta = torch.zeros(m, 2, 3, dtype=torch.float64)  # crop coordinates -> image coordinates in [-1, 1]
    theta[:, 0, 0] = side / w * flip
    theta[:, 0, 2] = 2 * cx / w - 1
    theta[:, 1, 1] = side / h
    theta[:, 1, 2] = 2 * cy / h - 1
    grid = F.affine_grid(theta.float(), [m, 3, size, size], align_corners=False)
    src = images[boxes[:, 0]].float().div_(255)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -- the classifier -----------------------------------------------------------------------------

class Classifier(nn.Module):
    """The segmentation trunk (output stride 32) + global average pooling + ``fc``."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        self.backbone = ResNet(depth=int(arch[len("resnet"):]), output_stride=32)
        self.fc = nn.Linear(self.backbone.channels[-1], num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float [B, 3, S, S] in [0, 1] -> logits float [B, num_classes]."""
        return self.fc(self.backbone((x - self.mean) / self.std)[-1].mean((2, 3)))

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        state |= {f"fc.{k}": v.detach().clone() for k, v in self.fc.state_dict().items()}
        return state


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, boxes: torch.Tensor, size: int, batch: int = 256
             ) -> tuple[float, list[float]]:
    """Top-1 accuracy of the centred crops of ``boxes`` int64 [M, 6] of ``images`` uint8 [N, 3, S, S]
    and the per-class accuracy (NaN for a class without crops), as Python floats."""
    model.eval()
    pred = torch.cat([model(crops(images, boxes[i:i + batch], size)).argmax(1) for i in range(0, len(boxes), batch)])
    target = boxes[:, 1] - 1
    per_class = []
    for c in range(model.fc.out_features):
        sel = target == c
        per_class.append(float((pred[sel] == c).float().mean()) if sel.any() else float("nan"))
    return float((pred == target).float().mean()), per_class


def _bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, unit="batch")


def pretrain(cfg: PretrainConfig, echo=print) -> dict:
    """Train the classifier of ``cfg`` and write its weights; returns the ``meta`` stored with them."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    images, boxes, names = _samples(cfg, held_out=False)
    held_images, held_boxes, _ = _samples(cfg, held_out=True)
    num_classes = len(names)
    if len(boxes) < cfg.batch_size or len(held_boxes) == 0:
        raise ConfigError(f"--scenes/--held-out: {len(boxes)} training and {len(held_boxes)} held-out crops; "
                          f"need at least --batch-size ({cfg.batch_size}) and 1")
    echo(f"pretraining a {cfg.arch} on {len(boxes)} {cfg.data} crops of {cfg.crop}x{cfg.crop} "
         f"(from {cfg.scenes} images), held out: {len(held_boxes)} crops; {cfg.epochs} epochs", flush=True)

    model = Classifier(cfg.arch, num_classes - 1)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    # AdamW: SGD at a rate that learns in a few hundred steps diverges in the first ones here
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(boxes) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = _bar(total, cfg.progress)
    history, step = [], 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(boxes), generator=generator)
        running = 0.0
        for k in range(steps_per_epoch):
            warm = min(1.0, (step + 1) / max(1, total // 20))  # linear warm-up over 5 %: BN starts cold
            lr = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / total))  # then cosine to 0
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = boxes[order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
            loss = F.cross_entropy(model(crops(images, rows, cfg.crop, generator)), rows[:, 1] - 1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the pretraining loss is {float(loss)} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{running / (k + 1):.3f}")
        acc, _ = accuracy(model, held_images, held_boxes, cfg.crop)
        history.append({"epoch": epoch + 1, "train_loss": running / max(steps_per_epoch, 1), "held_out_accuracy": acc})
        echo(f"epoch {epoch + 1}/{cfg.epochs}: train loss {running / max(steps_per_epoch, 1):.3f}, "
             f"held-out accuracy {100 * acc:.1f} %", flush=True)
    if bar is not None:
        bar.close()
    acc, per_class = accuracy(model, held_images, held_boxes, cfg.crop)
    meta = {
        "version": __version__, "config": asdict(cfg), "num_classes": num_classes - 1,
        "class_names": list(names[1:]), "train_crops": len(boxes), "held_out_crops": len(held_boxes),
        "held_out_accuracy": acc, "held_out_per_class": per_class, "history": history,
        "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(), "torch": str(torch.__version__),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .engine.checkpoint import atomic_save

    atomic_save({"state_dict": model.torchvision_state_dict(), "meta": meta}, out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    echo(f"held-out accuracy {100 * acc:.1f} % ({len(held_boxes)} crops); per class: "
         + ", ".join(f"{n} {100 * a:.0f}" for n, a in zip(names[1:], per_class)))
    echo(f"wrote {out} and {out.with_suffix('.json')} in {meta['seconds']:.0f} s; "
         f"use it with: python train.py --data {cfg.data} --pretrained {out}")
    return meta


def _per_data(name: str) -> str:
    return "(default: " + ", ".join(f"{data} {values[name]}" for data, values in PER_DATA.items()) + ")"


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """States a default unless it is None (those say theirs in the help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(prog="python -m semiseg_fast.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=_Defaults)
    p.add_argument("--data", default=d.data, help="fashion | synthetic")
    p.add_argument("--arch", default=d.arch, help=" | ".join(BACKBONES))
    p.add_argument("--out", default=None, help="weights file (default: weights/<data>_r<depth>.pt)")
    p.add_argument("--root", default=d.root, help="fashion: folder of the four Fashion-MNIST .gz files")
    p.add_argument("--scenes", type=int, default=None, help="pretraining images (fashion: garments) "
                   + _per_data("scenes"))
    p.add_argument("--held-out", type=int, default=None, help="held-out images for the accuracy "
                   + _per_data("held_out"))
    p.add_argument("--image-size", type=int, default=None, help="image side " + _per_data("image_size"))
    p.add_argument("--crop", type=int, default=d.crop, help="side of the classified crops")
    p.add_argument("--garment-side", type=float, nargs=2, default=d.garment_side, metavar=("LO", "HI"),
                   help="fashion: a garment's side, as fractions of --image-size (the scenes: 0.3 0.6 of 80)")
    p.add_argument("--epochs", type=int, default=None,
                   help=_per_data("epochs"))
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW peak rate: 5 %% linear warm-up, then cosine to 0")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0 = torch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    if args["out"] is None:
        args["out"] = f"weights/{args['data']}_r{args['arch'][len('resnet'):]}.pt"
    try:
        pretrain(PretrainConfig(**args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, OSError, FloatingPointError) as e:
        if os.environ.get("SEMISEG_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
