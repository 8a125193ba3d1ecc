"""Supervised baseline: cross-entropy on the labeled batch only."""
from __future__ import annotations

from ..nvtx import nvtx_range
from .base import Batch, Method
from .common import supervised_ce, upsample


class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.student = self.build_network()

    def losses(self, batch: Batch, progress):
        x, y = batch["x_l"], batch["y_l"]
        with nvtx_range("student"):
            logits = upsample(self.student(x)["logits"], y.shape[-2:])
        with nvtx_range("loss"):
            loss = supervised_ce(logits, y)
        return {"loss": loss, "loss_x": loss.detach()}
