"""UniMatch (CVPR'23, spec section 4): one network is both teacher and student.

Per iteration: the labeled batch and the weak unlabeled view go through the network in one
train-mode forward with feature perturbation (Dropout2d(0.5) on c1 and c4 of a doubled decoder
batch); its detached weak predictions label two strong views, each cut-mixed inside its own box
with a strong view of a second unlabeled batch (the "mix" batch) whose labels come from an
eval-mode, no-grad pass. Loss = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, every unsupervised
term summed over confident (>= conf_thresh) non-padded pixels and divided by the non-padded count.
There is no EMA teacher: the evaluated network is the trained one.
"""
from __future__ import annotations

import torch

from ..data.augment import cutmix_box, mix, strong_augment
from ..nvtx import nvtx_range
from .base import Batch, Method
from .common import confident_ce, pseudo_label, supervised_ce, upsample

#: UniMatch's loss weights of the supervised, two strong-view and feature-perturbation terms
WEIGHTS = {"x": 0.5, "s1": 0.125, "s2": 0.125, "fp": 0.25}


class UniMatch(Method):
    name = "unimatch"
    SWITCHES = {"mask_ratio": "the unsupervised losses (pixels at --conf-thresh)"}
    extra_unlabeled_batches = 1  # the mix batch: x_u1, pad_u1

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.student = self.build_network()

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        x_u, x_m = batch["x_u"], batch["x_u1"]
        b, _, h, w = x_u.shape
        # Labels of the mix batch: eval mode, no grad, before any strong view exists (as UniMatch).
        with nvtx_range("teacher_mix"), torch.no_grad():
            self.student.eval()
            logits_m = upsample(self.student(x_m)["logits"], (h, w))
            self.student.train()
        batch["logits_m"] = logits_m
        for view in ("1", "2"):
            box = cutmix_box(b, h, w, p=0.5, generator=generator)
            s_u = strong_augment(x_u, generator=generator)
            s_m = strong_augment(x_m, generator=generator)
            batch["x_s" + view], batch["box" + view] = mix(s_u, s_m, box), box
        return batch

    def weak_targets(self, batch: Batch, logits_w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pseudo-labels of the weak view (``logits_w`` float [B, C, H, W]) and of each strong view
        (cut-mixed with the mix batch): name -> (labels int64 [B, H, W], confidence float32
        [B, H, W], valid bool [B, H, W])."""
        valid = ~batch["pad_u"]
        valid_m = ~batch["pad_u1"]
        conf, pl = pseudo_label(logits_w)
        conf_m, pl_m = pseudo_label(batch["logits_m"])
        targets = {"w": (pl, conf, valid)}
        for view in ("1", "2"):
            box = batch["box" + view]
            targets["s" + view] = (mix(pl, pl_m, box), mix(conf, conf_m, box), mix(valid, valid_m, box))
        return targets

    def unimatch_losses(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """UniMatch's terms, plus what IPixMatch builds on (weak logits and strong-view logits)."""
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        size = y_l.shape[-2:]
        n_l = x_l.shape[0]
        with nvtx_range("student"):
            out = self.student(torch.cat((x_l, x_u)), need_fp=True)
            logits = upsample(out["logits"], size)
            logits_l, logits_w = logits[:n_l], logits[n_l:]
            logits_fp = upsample(out["logits_fp"][n_l:], size)
            logits_s = upsample(self.student(torch.cat((batch["x_s1"], batch["x_s2"])))["logits"], size)
            logits_s1, logits_s2 = logits_s.chunk(2)
        with nvtx_range("loss"):
            t = self.weak_targets(batch, logits_w.detach())
            thresh = self.cfg.conf_thresh
            terms = {
                "x": supervised_ce(logits_l, y_l),
                "s1": confident_ce(logits_s1, *t["s1"][:2], thresh, t["s1"][2]),
                "s2": confident_ce(logits_s2, *t["s2"][:2], thresh, t["s2"][2]),
                "fp": confident_ce(logits_fp, *t["w"][:2], thresh, t["w"][2]),
            }
        extras = {"logits_w": logits_w.detach(), "logits_s1": logits_s1, "logits_s2": logits_s2,
                  "logits_fp": logits_fp.detach()}
        return terms, extras | {"targets": t}

    def losses(self, batch: Batch, progress):
        terms, extras = self.unimatch_losses(batch)
        loss = sum(WEIGHTS[k] * v for k, v in terms.items())
        return self.report(loss, terms, extras)

    def report(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], extras: dict) -> dict[str, torch.Tensor]:
        """The step's outputs from the total ``loss`` and the ``terms`` (float 0-d tensors): the
        detached terms and the confident share of the weak view's valid pixels, float32 []."""
        pl, conf, valid = extras["targets"]["w"]
        keep = (conf >= self.cfg.conf_thresh) & valid
        # the feature-perturbed view agrees with the labels it learns on the pixels it learns them
        fp_agree = ((extras["logits_fp"].argmax(1) == pl) & keep).sum() / keep.sum().clamp(min=1)
        return {"loss": loss, **{f"loss_{k}": v.detach() for k, v in terms.items()}, "mask_ratio": keep.float().mean(),
                "fp_agree": fp_agree}
