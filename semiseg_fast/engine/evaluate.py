"""Confusion-matrix evaluation that stays on the device until the final summary."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .nvtx import nvtx_range


class ConfusionMatrix:
    """Accumulates a [C, C] matrix (rows = ground truth, columns = prediction) on the device."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        c = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        valid = target != self.ignore_index
        # Invalid pixels are sent to an extra bin that is cut off, so no boolean gather (host sync).
        idx = torch.where(valid, target * c + pred, torch.full_like(target, c * c))
        self.mat += torch.bincount(idx, minlength=c * c + 1)[: c * c].view(c, c)

    def reset(self) -> None:
        self.mat.zero_()

    def summary(self) -> "SegMetrics":
        return SegMetrics.from_confusion(self.mat)


@dataclass
class SegMetrics:
    iou: list[float]  # per class; NaN where the class is absent from both truth and prediction
    miou: float  # mean over the classes with a defined IoU
    pixel_acc: float
    confusion: torch.Tensor

    @staticmethod
    def from_confusion(mat: torch.Tensor) -> "SegMetrics":
        mat = mat.double().cpu()
        tp = mat.diag()
        union = mat.sum(0) + mat.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        defined = ~iou.isnan()
        miou = float(iou[defined].mean()) if defined.any() else float("nan")
        total = mat.sum()
        acc = float(tp.sum() / total) if total > 0 else float("nan")
        return SegMetrics(iou=iou.tolist(), miou=miou, pixel_acc=acc, confusion=mat.long())

    def table(self, class_names: list[str] | None = None) -> str:
        names = list(class_names or [f"class {i}" for i in range(len(self.iou))])
        width = max(len(n) for n in names + ["mIoU"])
        lines = [f"{'class':<{width}}  IoU (%)"]
        lines += [f"{n:<{width}}  {100 * v:6.2f}" for n, v in zip(names, self.iou)]
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou:6.2f}")
        lines.append(f"{'pixel acc':<{width}}  {100 * self.pixel_acc:6.2f}")
        return "\n".join(lines)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Arg-max prediction at the input resolution (logits up-sampled bilinearly, align_corners)."""
    logits = model(images)["logits"]
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)
    return logits.argmax(1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    ignore_index: int = 255,
) -> SegMetrics:
    """Evaluate on uint8 images [N,3,H,W] and labels [N,H,W]; the model is left in its prior mode."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, device=device, ignore_index=ignore_index)
    try:
        with nvtx_range("eval"):
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True).float().div_(255)
                y = labels[start : start + batch_size].to(device, non_blocking=True).long()
                with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype or torch.bfloat16,
                                    enabled=amp_dtype is not None):
                    pred = predict(model, x)
                cm.update(pred, y)
    finally:
        model.train(was_training)
    return cm.summary()
