"""How much of a pretrained backbone's class knowledge survives in the validation scenes, before any
segmentation training: the measurement behind the README's cause of the methods-table miss.

    python -m profiling.backbone_probe --data fashion --weights weights/fashion_r18.pt

The weights' own classifier ``fc`` (which ``--pretrained`` drops) is applied three ways to the
validation scenes, at the output strides a segmentation model can use:

* ``dense``: to every location of layer4, the logits up-sampled to the pixels (bilinear,
  align_corners, as the models predict); the share of object pixels whose arg-max over the object
  classes is their class: what a segmentation head starts from;
* ``mask``: to layer4's features (up-sampled) averaged over each object's own pixels, an oracle of
  where the object is; the share of objects right;
* ``box``: to the object cut out of its scene by its own bounding box (a square of the box's
  longer side times ``--context``, resampled to the pretraining crop; the pretraining's own samples
  frame a garment more loosely, by ``semiseg_fast.pretrain.MARGIN`` and more); the share of objects right.

An object is one (scene, class) pair, as ``semiseg_fast.pretrain.object_boxes`` gives them.
The weights' held-out accuracy on their own pretraining samples is printed beside, from their
``meta``.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from semiseg_fast.models import ResNet
from semiseg_fast.models.deeplabv3plus import IMAGENET_MEAN, IMAGENET_STD
from semiseg_fast.pretrain import object_boxes

__all__ = ["probe", "main"]


def _normalise(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _trunk(state: dict[str, torch.Tensor], depth: int, output_stride: int) -> ResNet:
    net = ResNet(depth, output_stride=output_stride)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    return net.eval()


@torch.no_grad()
def probe(state: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *, depth: int = 18,
          strides: tuple[int, ...] = (32, 16, 8), crop: int = 40, context: float = 1.0,
          batch: int = 50) -> dict[str, float]:
    """``state``: a ``pretrain`` weights file's torchvision-named tensors with ``fc``; ``images`` uint8
    [N, 3, H, W] and ``labels`` int64 [N, H, W] (0 = background, class c is ``fc`` row c - 1).
    ``depth``: the ResNet's (18, 50, 101). Returns fractions in [0, 1]: ``dense_os<s>`` and ``mask_os<s>`` per stride, ``box`` and the
    ``objects`` count (see the module docstring)."""
    weight, bias = state["fc.weight"], state["fc.bias"]
    num_classes = weight.shape[0] + 1
    labels = labels.long()
    boxes = object_boxes(labels, num_classes, min_pixels=1)
    x = _normalise(images)
    objects = labels > 0
    out: dict[str, float] = {"objects": float(len(boxes))}
    if len(boxes) == 0:
        raise ValueError("labels: the scenes hold no object pixels")
    for stride in strides:
        net = _trunk(state, depth, stride)
        right_pixels = right_objects = 0
        for start in range(0, len(x), batch):
            c4 = net(x[start:start + batch])[-1]
            c4 = F.interpolate(c4, size=labels.shape[-2:], mode="bilinear", align_corners=True)
            logits = torch.einsum("bchw,kc->bkhw", c4, weight) + bias.view(1, -1, 1, 1)
            y = labels[start:start + batch]
            pred = logits.argmax(1) + 1
            right_pixels += int((pred == y)[y > 0].sum())
            for row in boxes[(boxes[:, 0] >= start) & (boxes[:, 0] < start + batch)]:
                i, c = int(row[0]) - start, int(row[1])
                pooled = c4[i][:, y[i] == c].mean(1)
                right_objects += int(int((weight @ pooled + bias).argmax()) + 1 == c)
        out[f"dense_os{stride}"] = right_pixels / int(objects.sum())
        out[f"mask_os{stride}"] = right_objects / len(boxes)

    net = _trunk(state, depth, 32)
    h, w = labels.shape[-2:]
    top, left, bottom, right = boxes[:, 2:].double().unbind(1)
    half = torch.maximum(bottom - top + 1, right - left + 1) * context / 2
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = 2 * half / w, (left + right + 1) / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = 2 * half / h, (top + bottom + 1) / h - 1
    right_box = 0
    for start in range(0, len(boxes), batch):
        part = boxes[start:start + batch]
        grid = F.affine_grid(theta[start:start + batch].float(), [len(part), 3, crop, crop], align_corners=False)
        cut = F.grid_sample(x[part[:, 0]], grid, mode="bilinear", padding_mode="border", align_corners=False)
        pred = (net(cut)[-1].mean((2, 3)) @ weight.T + bias).argmax(1) + 1
        right_box += int((pred == part[:, 1]).sum())
    out["box"] = right_box / len(boxes)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.backbone_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fashion", help="fashion | synthetic")
    p.add_argument("--weights", required=True, help="a weights file written by semiseg_fast.pretrain")
    p.add_argument("--num-val", type=int, default=200, help="validation scenes (as train.py's --num-val)")
    p.add_argument("--image-size", type=int, default=80)
    p.add_argument("--context", type=float, default=1.0, help="box crop side / the box's longer side")
    p.add_argument("--cache-dir", default=".cache/semiseg_fast")
    args = p.parse_args(argv)
    if args.data not in ("fashion", "synthetic"):
        p.error(f"--data: expected fashion or synthetic, got {args.data!r}")
    if args.context <= 0:
        p.error(f"--context: must be > 0, got {args.context}")
    try:
        loaded = torch.load(args.weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        print(f"error: --weights: {args.weights}: {e}", file=sys.stderr)
        return 2
    if not isinstance(loaded, dict) or "fc.weight" not in loaded.get("state_dict", {}):
        print(f"error: --weights: {args.weights} is not a semiseg_fast.pretrain file (no state_dict with fc)",
              file=sys.stderr)
        return 2
    meta = loaded.get("meta", {})
    if args.data == "fashion":
        from semiseg_fast.data.fashion import load_fashion as load
    else:
        from semiseg_fast.data.synthetic import load_synthetic as load
    val = load("val", args.num_val, args.image_size, cache_dir=args.cache_dir or None)
    config = meta.get("config", {})
    crop, arch = int(config.get("crop", 40)), str(config.get("arch", "resnet18"))
    r = probe(loaded["state_dict"], val.images, val.labels, depth=int(arch[len("resnet"):]), crop=crop,
              context=args.context)
    held = meta.get("held_out_accuracy")
    print(f"{args.weights}: held-out accuracy on its own samples "
          f"{'n/a' if held is None else f'{100 * held:.1f} %'}; {int(r['objects'])} objects in {args.num_val} "
          f"validation scenes of {args.data}")
    for stride in (32, 16, 8):
        print(f"  output stride {stride:2d}: fc per location, object pixels right {100 * r[f'dense_os{stride}']:5.1f} %; "
              f"fc on mask-pooled features, objects right {100 * r[f'mask_os{stride}']:5.1f} %")
    print(f"  objects cut out by their box (x{args.context:g}) at {crop} px, classified whole: {100 * r['box']:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
