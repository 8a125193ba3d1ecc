"""CTT, cross-teacher training (Neurocomputing'22, spec/methods.md section 2).

P = 2 (or 3) student-teacher pairs with different initialisations; each teacher is the EMA of its
student. For student l and its peer r = (l + 1) mod P, per iteration:

* L_s: CE on the labeled batch;
* L_ct: the **peer's teacher** labels the weak unlabeled view; the student learns those labels on the
  strong view, every pixel weighted by one scalar w = fraction of pixels with confidence >= 0.968;
* L_HC (``ops.class_bank_contrast`` mode "hc", t = 0.1): anchors = the student's unit features of the
  labeled pixels (class = GT) and of the unlabeled pixels whose cross-teacher confidence >= gamma
  (class = pseudo-label), against every entry of the student's own class memory bank;
* L_LC (mode "lc", t = 0.5): anchors = the unlabeled pixels below gamma, class = arg-max of the peer
  student's prediction, positive = the peer student's feature at the same pixel (stop-gradient),
  negatives = the other classes' entries of both pairs' banks; by default only where the peer
  student is more confident than this one (the paper's directional mask; ``--no-ctt-directional``
  = the v2 script, no mask);
* L = sum over pairs of L_s + L_ct + w_hc L_HC + w_lc L_LC.

After the optimizer step each teacher is updated by EMA (decay min(1 - 1/(t + 1), 0.99)) and then
writes its bank from the labeled batch at 1/8: per class the pixels whose GT is c, whose arg-max is
c and whose maximal **raw logit** is >= 0.95 (no softmax, as the code), best k by that logit, k =
max(2 Q / N_l, batch size) (``bank.ctt_admission_k``). HC and LC switch on once every queue of
every bank is full.

Paper, not code: the released scripts compute HC and LC but never add them to the loss; we add
them, with weights of our choosing (the paper's lambdas are not in the text we have): 0.1 each.
Our choices for the rest: both students see the **same** strong view (photometric jitter, blur,
CutMix with the next image of the batch), so LC's "same pixel" of the peer is the same image
content (the official City script uses ClassMix, VOC none); padded pixels are ignored in L_ct and
in w; pair 0's teacher is the evaluated model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..data.augment import mix
from ..nvtx import nvtx_range
from .bank import ClassMemoryBank, ctt_admission_k, topk_admission
from .base import Batch, Method
from .common import (
    IGNORE,
    confident_fraction,
    downsample_nearest,
    pseudo_label,
    strong_cutmix_view,
    supervised_ce,
    to_rows,
    upsample,
)
from .ema import EMA, ema_decay
from .options import FRACTION, INT_AT_LEAST_1, NON_NEGATIVE, Options, one_of, option

PL_WEIGHT_THRESH = 0.968  # confidence counted in the pseudo-label weight w
BANK_LOGIT = 0.95  # bank admission: maximal raw logit at least this
TAU_HC, TAU_LC = 0.1, 0.5


@dataclass
class CTTOptions(Options):
    """``--ctt-*`` (None = the paper's value)."""

    ctt_pairs: int | None = option("ctt: student-teacher pairs (2 or 3)", paper=2, check=one_of(2, 3))
    ctt_bank: int | None = option("ctt: memory bank entries per class (paper code 256)", paper=256,
                                  check=INT_AT_LEAST_1)
    ctt_gamma: float | None = option("ctt: cross-teacher confidence splitting HC from LC anchors", paper=0.75,
                                     check=FRACTION)
    ctt_hc_weight: float | None = option("ctt: weight of the high-confidence contrast (paper's value lost; ours)",
                                         paper=0.1, check=NON_NEGATIVE)
    ctt_lc_weight: float | None = option("ctt: weight of the low-confidence contrast (paper's value lost; ours)",
                                         paper=0.1, check=NON_NEGATIVE)
    ctt_directional: bool = option("ctt: LC only where the peer student is more confident (paper); off = v2 script",
                                   default=True)


class CTT(Method):
    name = "ctt"
    ARCH = "deeplabv2"
    OPTIONS = CTTOptions
    SYNTHETIC = {}  # the paper's sizes already fit the CPU preset
    SWITCHES = {"contrast_on": "the HC/LC contrasts (they wait until every class bank is full)"}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        # built one after another, so each student draws its own initial weights
        self.nets = nn.ModuleList(self.build_network(rep_head="ctt") for _ in range(cfg.ctt_pairs))
        self.emas = nn.ModuleList(self.make_teacher(s) for s in self.nets)
        self._ema = [EMA(s, t) for s, t in zip(self.nets, self.emas)]
        self.banks = nn.ModuleList(ClassMemoryBank(num_classes, 256, cfg.ctt_bank) for _ in self.nets)

    def students(self):
        return list(self.nets)

    def teachers(self):
        return list(self.emas)

    def eval_model(self):
        return self.emas[0]

    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        batch["x_s"], batch["box"] = strong_cutmix_view(batch["x_u"], generator)
        self._labeled = (batch["x_l"], batch["y_l"])  # the teachers fill their banks from it after the step
        return batch

    def losses(self, batch: Batch, progress):
        cfg, pairs = self.cfg, len(self.nets)
        x_l, y_l, box = batch["x_l"], batch["y_l"], batch["box"]
        n_l, size = x_l.shape[0], y_l.shape[-2:]
        valid = mix(~batch["pad_u"], ~batch["pad_u"].roll(1, 0), box)
        with nvtx_range("teacher"), torch.no_grad():
            targets = []
            for teacher in self.emas:
                conf, pl = pseudo_label(upsample(teacher(batch["x_u"])["logits"], size))
                targets.append((mix(conf, conf.roll(1, 0), box), torch.where(valid, mix(pl, pl.roll(1, 0), box), IGNORE)))
        with nvtx_range("student"):
            outs = [net(torch.cat((x_l, batch["x_s"]))) for net in self.nets]
        # every queue of every bank full: a device flag, applied by masking the anchors
        contrast_on = torch.stack([bank.is_full() for bank in self.banks]).all()
        logs: dict[str, torch.Tensor] = {}
        total = 0.0
        for l, out in enumerate(outs):
            r = (l + 1) % pairs
            conf, pl = targets[r]
            with nvtx_range("loss"):
                logits_l, logits_s = upsample(out["logits"], size).split([n_l, batch["x_s"].shape[0]])
                loss_s = supervised_ce(logits_l, y_l)
                weight = confident_fraction(conf, PL_WEIGHT_THRESH, valid)
                loss_ct = weight * supervised_ce(logits_s, pl)
            with nvtx_range("loss/contrast"):
                grid = out["rep"].shape[-2:]
                y_small = downsample_nearest(y_l, grid)
                pl_small = downsample_nearest(pl, grid)
                conf_small = downsample_nearest(conf, grid)
                z = out["rep"].float()
                # HC: labeled pixels by GT, confident unlabeled pixels by the cross-teacher label
                hc_u = torch.where((conf_small >= cfg.ctt_gamma) & (pl_small != IGNORE), pl_small, -1)
                hc_labels = torch.cat((torch.where(y_small != IGNORE, y_small, -1), hc_u)).reshape(-1)
                hc_labels = torch.where(contrast_on, hc_labels, -1)
                loss_hc = ops.class_bank_contrast(to_rows(z), hc_labels, self.banks[l].keys(), "hc",
                                                  temperature=TAU_HC, fill=self.banks[l].fill)
                # LC: the remaining unlabeled pixels, labeled and pulled by the peer student
                with torch.no_grad():
                    peer_conf, peer_label = outs[r]["logits"][n_l:].float().softmax(1).max(1)
                    own_conf = out["logits"][n_l:].float().softmax(1).amax(1)
                lc_mask = (conf_small < cfg.ctt_gamma) & (pl_small != IGNORE)
                if cfg.ctt_directional:
                    lc_mask = lc_mask & (peer_conf > own_conf)
                lc_labels = torch.where(lc_mask & contrast_on, peer_label, -1).reshape(-1)
                both = torch.cat((self.banks[l].keys(), self.banks[r].keys()), dim=1)
                loss_lc = ops.class_bank_contrast(to_rows(z[n_l:]), lc_labels, both, "lc",
                                                  positive=to_rows(outs[r]["rep"][n_l:].float()),
                                                  temperature=TAU_LC)
            total = total + loss_s + loss_ct + cfg.ctt_hc_weight * loss_hc + cfg.ctt_lc_weight * loss_lc
            for k, v in (("s", loss_s), ("ct", loss_ct), ("hc", loss_hc), ("lc", loss_lc), ("w", weight)):
                logs[f"loss_{k}{l}" if k != "w" else f"pl_weight{l}"] = v.detach()
        fill = torch.stack([bank.fill_fraction() for bank in self.banks]).mean()
        return {"loss": total, **logs, "contrast_on": contrast_on.float(), "bank_fill": fill}

    def is_confident(self, prob, valid):
        # CTT trains on every pixel, weighted by the share that reaches this confidence
        return (prob.amax(1) >= PL_WEIGHT_THRESH) & valid

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        with nvtx_range("ema"):
            for ema in self._ema:
                ema.update(ema_decay(step, self.cfg.ema_decay))
        with nvtx_range("bank"):
            x_l, y_l = self._labeled
            # under DDP the admission runs on all ranks' pixels (gathered), as one process would
            global_batch = x_l.shape[0] * self.dist.world
            k = ctt_admission_k(self.num_labeled or global_batch, global_batch, self.cfg.ctt_bank)
            for teacher, bank in zip(self.emas, self.banks):
                out = teacher(x_l)
                logits = out["logits"].float()
                labels = self.dist.gather(downsample_nearest(y_l, logits.shape[-2:]).reshape(-1))
                top_logit, pred = (self.dist.gather(t.reshape(-1)) for t in logits.max(1))
                keys = self.dist.gather(to_rows(out["rep"].float()))
                candidate = (labels != IGNORE) & (pred == labels) & (top_logit >= BANK_LOGIT)
                keep, rank = topk_admission(top_logit, labels, candidate, k, return_rank=True)
                # the official writes a class best-first when it had >= k candidates, else in pixel order
                n_cand = torch.zeros(self.num_classes + 1, dtype=torch.long, device=labels.device)
                n_cand.index_add_(0, torch.where(candidate, labels, self.num_classes), torch.ones_like(labels))
                full_class = n_cand.index_select(0, labels.clamp_max(self.num_classes)) >= k
                order = torch.where(full_class, rank, torch.arange(labels.numel(), device=labels.device))
                bank.enqueue(keys, labels, keep, order)
