"""FixMatch for segmentation with a mean teacher.

The EMA teacher labels the weak view; the student learns those labels on a strong view
(photometric jitter, grayscale, blur, then CutMix with the next image of the batch), keeping only
pixels whose teacher confidence reaches ``conf_thresh``. Labeled and strong unlabeled images go
through the student in one forward, as UniMatch does, so BatchNorm sees both.
"""
from __future__ import annotations

import torch

from ..data.augment import mix
from ..nvtx import nvtx_range
from .base import Batch, Method
from .common import confident_ce, pseudo_label, strong_cutmix_view, supervised_ce, upsample
from .ema import EMA, ema_decay


class FixMatch(Method):
    name = "fixmatch"
    SWITCHES = {"mask_ratio": "the unsupervised loss (pixels at --conf-thresh)"}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.student = self.build_network()
        self.teacher = self.make_teacher(self.student)
        self._ema = EMA(self.student, self.teacher)

    def teachers(self):
        return [self.teacher]

    def eval_model(self):
        return self.teacher

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        batch["x_s"], batch["box"] = strong_cutmix_view(batch["x_u"], generator)
        return batch

    def losses(self, batch: Batch, progress):
        x_l, y_l, x_s, box = batch["x_l"], batch["y_l"], batch["x_s"], batch["box"]
        size = y_l.shape[-2:]
        with nvtx_range("teacher"), torch.no_grad():
            conf, pl = pseudo_label(upsample(self.teacher(batch["x_u"])["logits"], size))
            # the pseudo-labels travel with the pixels through the same CutMix
            conf = mix(conf, conf.roll(1, 0), box)
            pl = mix(pl, pl.roll(1, 0), box)
            valid = mix(~batch["pad_u"], ~batch["pad_u"].roll(1, 0), box)
        with nvtx_range("student"):
            logits = upsample(self.student(torch.cat((x_l, x_s)))["logits"], size)
            logits_l, logits_s = logits.split([x_l.shape[0], x_s.shape[0]])
        with nvtx_range("loss"):
            loss_x = supervised_ce(logits_l, y_l)
            loss_u = confident_ce(logits_s, pl, conf, self.cfg.conf_thresh, valid)
            loss = loss_x + self.cfg.unsup_weight * loss_u
        mask_ratio = ((conf >= self.cfg.conf_thresh) & valid).float().mean()
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask_ratio": mask_ratio}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        with nvtx_range("ema"):
            self._ema.update(ema_decay(step, self.cfg.ema_decay))
