"""U2PL (CVPR'22, spec/methods.md section 1): reliable pseudo-labels by entropy, unreliable pixels
as negatives in a contrastive loss against per-class memory banks.

Per iteration (after a supervised-only burn-in of ``u2pl_sup_only`` of the run):

1. the EMA teacher, in eval mode, labels the weak unlabeled view (arg-max); U2PL's CutMix (one coin
   for the batch, box of area HW/2 from image (i + 1) mod B) mixes images and labels;
2. a second no-grad teacher pass, in train mode, on [labeled; mixed] gives the class probabilities
   and rank masks, the teacher representation (1/4) and, up-sampled, the entropy H of every
   unlabeled pixel (``ops.teacher_stats``: one read of the 1/4 logits); one
   selection gives three percentiles of H over the non-ignored pixels: T_u (q = 100 - 20 (1 - t)),
   low (alpha_t = 20 (1 - t)) and high (100 - alpha_t), t = the fraction of the run done;
3. L_u = CE on the pixels with H < T_u, weighted by (pixels / kept pixels) as the official code;
4. L_c (``ops.sampled_contrast``): per class c, 256 anchors drawn from the student representation at
   the low-entropy pixels labeled c whose teacher probability of c exceeds 0.3, the positive is the
   class prototype (teacher representation averaged over the low-entropy pixels labeled c) and 50
   negatives per anchor are drawn from class c's queue; the queue receives this step's teacher
   features of the pixels that are hard negatives of c first;
5. L = L_s + L_u + w_c L_c, then the teacher follows the student by EMA.

Steps 1, 2, the queue writes and all index sampling are no-grad and run in ``augment`` (eager: the
percentile schedule changes a Python argument every step), so the captured ``losses`` holds only
the student pass and the three losses.

Paper intent by default, official behaviour by flag (DESIGN.md):
* negatives of class c are pixels **not** labeled c (labeled: c among the teacher's top r_l = 3
  classes; unlabeled: rank of c in [r_l, r_h) = [3, 20), high entropy); ``u2pl_official_q2``
  reproduces the official mask, which asks label == c as well, so labeled negatives never exist;
* the i-th processed class uses its own anchors, prototype and queue; ``u2pl_official_q1``
  reproduces the official loop (anchors and prototype of class i, queue of the i-th class of V);
* w_c = 0.1 (paper; the official config leaves it at 1: ``--u2pl-contrast-weight 1``).

Our choices where the official code depends on its setting: the schedules use the continuous
fraction of the run instead of the epoch index; the official draws its indices from the CPU
generator with ``torch.randint``, ours come from the run's device generator (float64 uniforms);
during the burn-in the teacher is left alone and becomes a copy of the student at its end
(the official also copies it on every step of that epoch, quirk Q5, a one-epoch detail).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..data.augment import u2pl_cutmix, u2pl_cutmix_mask
from ..nvtx import nvtx_range
from .bank import ClassMemoryBank
from .base import Batch, Method
from .common import IGNORE, downsample_nearest, supervised_ce, to_rows, upsample
from .ema import EMA, ema_decay
from .options import FRACTION, INT_AT_LEAST_1, NON_NEGATIVE, Options, option
from .u2pl_sampling import contrast_targets, draw_uniforms, enqueue_negatives, sample_contrast

DROP = 20.0  # percent of unlabeled pixels dropped at the start (drop_percent 80)
ALPHA0 = 20.0  # low/high entropy percentile at the start
LOW_RANK, HIGH_RANK = 3, 20  # r_l, r_h
TEMPERATURE = 0.5
CUTMIX_P = 0.5


@dataclass
class U2PLOptions(Options):
    """``--u2pl-*`` (None = the method's default for the data set: the paper's, or the synthetic preset)."""

    u2pl_contrast_weight: float | None = option("u2pl: weight of the contrastive loss (paper 0.1; official code 1)",
                                                paper=0.1, check=NON_NEGATIVE)
    u2pl_queue: int | None = option("u2pl: negative queue length per class (paper 30000)", paper=30000,
                                    check=INT_AT_LEAST_1)
    u2pl_queue_bg: int | None = option("u2pl: negative queue length of class 0 (paper 50000)", paper=50000,
                                       check=INT_AT_LEAST_1)
    u2pl_sup_only: float | None = option("u2pl: fraction of the run trained supervised only (paper 1 of 80 epochs)",
                                         paper=1 / 80, check=FRACTION)
    u2pl_official_q1: bool = option("u2pl: reproduce official bug Q1 (negatives of class V[i] for anchors of class i)",
                                    default=False)
    u2pl_official_q2: bool = option("u2pl: reproduce official bug Q2 (negatives must carry the class's own label)",
                                    default=False)


def drop_weighted_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """U2PL's unsupervised loss, float32 []: (all pixels / kept pixels) * mean CE over the kept pixels
    of ``logits`` float [B, C, H, W] against ``target`` int64 [B, H, W] (255 = dropped)."""
    per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    kept = (target != IGNORE).sum().clamp(min=1)
    return per_pixel.sum() * target.numel() / kept**2


class U2PL(Method):
    name = "u2pl"
    ARCH = "deeplabv3plus_u2pl"
    ddp_find_unused_parameters = True  # the rep head is idle during the supervised burn-in
    SWITCHES = {"contrast_classes": "the contrastive loss (classes with anchors and negatives)"}
    OPTIONS = U2PLOptions
    # CPU preset: the UniMatch DeepLabV3+ (OS 16, the supervised baseline's model, half the cost
    # of U2PL's OS-8 512-channel decoder) with a rep head; 16 images of 16 x 16 rep pixels per
    # step, so queues get the share of a step's pixels that 30000 has of VOC's 133k; 5 % burn-in.
    SYNTHETIC = {"arch": "deeplabv3plus", "u2pl_queue": 1000, "u2pl_queue_bg": 1667, "u2pl_sup_only": 0.05}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.student = self.build_network(rep_head=True)
        self.teacher = self.make_teacher(self.student)
        self._ema = EMA(self.student, self.teacher)
        caps = [cfg.u2pl_queue_bg] + [cfg.u2pl_queue] * (num_classes - 1)
        self.bank = ClassMemoryBank(num_classes, self.student.rep_dim, caps)
        self.sup_only_steps = round(cfg.u2pl_sup_only * cfg.iters)

    def teachers(self):
        return [self.teacher]

    def eval_model(self):
        return self.teacher if self.step >= self.sup_only_steps else self.student

    # -- no-grad preparation -------------------------------------------------------------------
    @torch.no_grad()
    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        if self.step < self.sup_only_steps:
            return batch
        if self.step == self.sup_only_steps:
            self._ema.copy_()
        cfg = self.cfg
        x_l, y_l, x_u = batch["x_l"], batch["y_l"], batch["x_u"]
        n_l, size = x_l.shape[0], y_l.shape[-2:]
        with nvtx_range("teacher"):
            # arg-max of the up-sampled logits, up-sampled in the kernel (never stored at crop size)
            pl = ops.teacher_stats(self.teacher(x_u)["logits"], size, entropy=False, max_prob=False).argmax
            pl = torch.where(batch["pad_u"], IGNORE, pl)
            box = u2pl_cutmix_mask(x_u.shape[0], *size, p=CUTMIX_P, generator=generator)
            x_mix, pl_mix = u2pl_cutmix([x_u, pl], box)
            self.teacher.train()  # batch statistics, as the official second pass
            out_t = self.teacher(torch.cat((x_l, x_mix)))
            self.teacher.eval()
        logits_t, rep_t = out_t["logits"], to_rows(out_t["rep"].float())  # the fused pass reads bf16 as is
        grid = logits_t.shape[-2:]

        with nvtx_range("pseudo_labels"):
            t = self.step / cfg.iters
            alpha = ALPHA0 * (1 - t)
            valid_u = pl_mix != IGNORE
            # one pass: entropy of the mixed images at crop size, softmax and rank bits of all at 1/4
            stats = ops.teacher_stats(logits_t, size, first_image=n_l, max_prob=False, argmax=False,
                                      prob=True, rank=True, low_rank=LOW_RANK, high_rank=HIGH_RANK)
            ent = stats.entropy
            t_drop, t_low, t_high = ops.percentile(ent, [100 - DROP * (1 - t), alpha, 100 - alpha], valid_u)
            batch["x_mix"] = x_mix
            batch["target_u"] = torch.where(ent >= t_drop, IGNORE, pl_mix)

        with nvtx_range("bank"):
            labels = downsample_nearest(torch.cat((y_l, pl_mix)), grid).reshape(-1)
            labeled_ok = y_l != IGNORE
            low = downsample_nearest(torch.cat((labeled_ok, (ent <= t_low) & valid_u)), grid).reshape(-1)
            high = downsample_nearest(torch.cat((labeled_ok, (ent >= t_high) & valid_u)), grid).reshape(-1)
            candidates, proto, present, negative = contrast_targets(
                rep_t, labels, low, high, to_rows(stats.prob), to_rows(stats.unlabeled), to_rows(stats.labeled),
                n_l * grid[0] * grid[1], cfg.u2pl_official_q2)
            # under DDP every rank enqueues all ranks' keys, rank by rank (official concat_all_gather)
            enqueue_negatives(self.bank, self.dist.gather(rep_t), self.dist.gather(negative))

        with nvtx_range("sampling"):
            uniforms = draw_uniforms(generator, self.num_classes, labels.device)
            batch.update(sample_contrast(self.bank, candidates, present, *uniforms, cfg.u2pl_official_q1))
            batch["proto"] = proto
        return batch

    # -- the differentiable part ---------------------------------------------------------------
    def losses(self, batch: Batch, progress):
        x_l, y_l = batch["x_l"], batch["y_l"]
        size = y_l.shape[-2:]
        if "x_mix" not in batch:  # supervised burn-in
            with nvtx_range("student"):
                logits = upsample(self.student(x_l)["logits"], size)
            loss_x = supervised_ce(logits, y_l)
            zero = loss_x.detach() * 0
            return {"loss": loss_x, "loss_x": loss_x.detach(), "loss_u": zero, "loss_c": zero, "kept_ratio": zero,
                    "contrast_classes": zero, "bank_fill": self.bank.fill_fraction()}
        with nvtx_range("student"):
            out = self.student(torch.cat((x_l, batch["x_mix"])))
            logits_l, logits_u = upsample(out["logits"], size).split([x_l.shape[0], batch["x_mix"].shape[0]])
        with nvtx_range("loss"):
            loss_x = supervised_ce(logits_l, y_l)
            loss_u = drop_weighted_ce(logits_u, batch["target_u"])
        with nvtx_range("loss/contrast"):
            # negatives index the flattened queues: a view, so Q1's class remapping copies nothing
            bank = self.bank.keys().view(-1, self.bank.dim)
            loss_c = ops.sampled_contrast(to_rows(out["rep"]).float(), batch["proto"], bank, batch["anchor_idx"],
                                          batch["neg_idx"], TEMPERATURE, num_valid=batch["num_valid"],
                                          active=batch["active"])
        loss = loss_x + loss_u + self.cfg.u2pl_contrast_weight * loss_c
        kept = (batch["target_u"] != IGNORE).float().mean()
        return {"loss": loss, "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_c": loss_c.detach(),
                "kept_ratio": kept, "contrast_classes": batch["active"].float().sum(), "bank_fill": self.bank.fill_fraction()}

    def is_confident(self, prob, valid):
        # U2PL keeps the pixels below the drop percentile of the entropy (no absolute threshold)
        ent = -(prob * prob.clamp_min(1e-12).log()).sum(1)
        if not bool(valid.any()):
            return valid
        t_drop = torch.quantile(ent[valid].float(), (100 - DROP * (1 - self.step / self.cfg.iters)) / 100)
        return (ent < t_drop) & valid

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step >= self.sup_only_steps:
            with nvtx_range("ema"):
                self._ema.update(ema_decay(step, self.cfg.ema_decay, start=self.sup_only_steps))
