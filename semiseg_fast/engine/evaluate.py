"""Confusion-matrix evaluation that stays on the device until the final summary.

``val_confusion(data, model, ...)`` is the evaluation loop the trainer runs: the data set hands out
validation batches (``val_batches``) and says how to look at them (``eval_window``,
``eval_stride``: whole images or UniMatch's sliding window); this module predicts and counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..nvtx import nvtx_range


class ConfusionMatrix:
    """Accumulates ``mat`` int64 [C, C] (rows = ground truth, columns = prediction) on the device."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count ``pred`` int [B, H, W] against ``target`` int [B, H, W] (any shape, the same for both);
        ``ignore_index`` pixels are skipped."""
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
        """Metrics of a confusion matrix ``mat`` int [C, C] (rows truth, columns prediction)."""
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
    """Arg-max prediction int64 [B, H, W] of ``images`` float [B, 3, H, W] at the input resolution
    (logits up-sampled bilinearly, align_corners)."""
    logits = model(images)["logits"]
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)
    return logits.argmax(1)


@torch.no_grad()
def confusion(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Confusion matrix int64 [C, C] (on ``device``) of ``images`` uint8 [N, 3, H, W] against
    ``labels`` int [N, H, W].

    The model is left in its prior mode. Under DDP every rank passes its own shard of the
    validation set and the matrices are summed with one all-reduce.
    """
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
    return cm.mat


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             **kwargs) -> SegMetrics:
    """Metrics of ``model`` on ``images`` uint8 [N, 3, H, W] and ``labels`` int [N, H, W] (options as
    ``confusion``)."""
    return SegMetrics.from_confusion(confusion(model, images, labels, num_classes, **kwargs))


def sliding_windows(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """UniMatch's window spans along one side: starts 0, stride, 2 stride, ... below ``size``, each
    ``window`` long and cut at the border (so the last ones may be shorter)."""
    return [(start, min(size, start + window)) for start in range(0, size, stride)]


@torch.no_grad()
def predict_sliding(model: torch.nn.Module, images: torch.Tensor, window: int, stride: int | None = None,
                    batch_size: int = 1) -> torch.Tensor:
    """Arg-max prediction int64 [B, H, W] of ``images`` float [B, 3, H, W] by sliding-window inference.

    As UniMatch's ``evaluate(mode='sliding_window')``: windows of side ``window`` start every
    ``stride`` pixels (default ``int(2/3 window)``) in both directions and are cut at the image
    border; each window's logits are up-sampled to the window (bilinear, align_corners, as
    ``predict``), turned into probabilities (softmax, float32) and summed into the image; the sum
    is divided by the number of windows covering each pixel before the arg-max. Images no larger
    than the window on both sides (or ``window`` <= 0) are predicted whole by ``predict``.
    ``batch_size``: windows of the same size that go through the model together (per image).
    """
    b, _, h, w = images.shape
    if window <= 0 or (h <= window and w <= window):
        return predict(model, images)
    stride = int(window * 2 / 3) if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"predict_sliding: stride must be in [1, window={window}], got {stride}")
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for r0, r1 in sliding_windows(h, window, stride):
        for c0, c1 in sliding_windows(w, window, stride):
            groups.setdefault((r1 - r0, c1 - c0), []).append((r0, r1, c0, c1))
    total = None
    count = torch.zeros(1, 1, h, w, dtype=torch.float32, device=images.device)
    chunk = max(1, int(batch_size) // b)
    for (wh, ww), spans in groups.items():
        for start in range(0, len(spans), chunk):
            part = spans[start : start + chunk]
            crops = torch.cat([images[:, :, r0:r1, c0:c1] for r0, r1, c0, c1 in part])
            logits = model(crops)["logits"]
            if logits.shape[-2:] != (wh, ww):
                logits = F.interpolate(logits, size=(wh, ww), mode="bilinear", align_corners=True)
            probs = logits.float().softmax(1)
            if total is None:
                total = torch.zeros(b, probs.shape[1], h, w, dtype=torch.float32, device=images.device)
            for k, (r0, r1, c0, c1) in enumerate(part):
                total[:, :, r0:r1, c0:c1] += probs[k * b : (k + 1) * b]
                count[:, :, r0:r1, c0:c1] += 1
    return (total / count).argmax(1)


@torch.no_grad()
def val_confusion(data, model: torch.nn.Module, *, batch_size: int, device: torch.device | str,
                  amp_dtype: torch.dtype | None = None, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's confusion matrix int64 [C, C] (rows truth, columns prediction) of ``model`` over
    the validation images ``rank::world`` of ``data`` (see ``data/source.py`` for what a data set
    offers). The model is left in its prior mode; under DDP the trainer sums the ranks' matrices."""
    device = torch.device(device)
    cm = ConfusionMatrix(data.num_classes, device=device, ignore_index=data.ignore_index)
    was_training = model.training
    model.eval()
    bar = None
    if data.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=data.num_val_batches(batch_size, rank, world), desc=f"val {getattr(data, 'name', '')}".strip(),
                   unit="img", leave=False, dynamic_ncols=True)
    try:
        for x, y in data.val_batches(device=device, batch_size=batch_size, rank=rank, world=world):
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                pred = predict_sliding(model, x, data.eval_window, data.eval_stride, batch_size=batch_size)
            cm.update(pred, y)
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return cm.mat
