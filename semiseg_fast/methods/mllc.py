"""MLLC, multi-level label correction with graph layers (TMM'24, spec/methods.md section 3).

The network is CTT's DeepLabV2 with two heads: logits Z0 and a 256-d embedding F0 at 1/8, followed
by K (default 2) graph rounds (Z_{k+1}, F_{k+1}) = G2Net_k(Z_k, F_k), each image a graph of its
pixels (``ops.graph_propagate``):

* semantic graph (SLG side): normalised symmetric 21-NN graph of F; Z is mixed with its graph
  average, 0.2/0.8 at pixels that are confident (>= 0.95 or >= the class's dynamic threshold eta_c),
  0.8/0.2 elsewhere; two 1x1 convs follow;
* class graph (CLG side): F is propagated over the pixels of the same predicted class, weighted by
  the cosine of their class distributions; two 1x1 convs with a ReLU follow. The mask is label
  equality (the intended one) unless ``--mllc-official-mask`` reproduces the official layout.

eta_c = 0.95 w_c / max w, w_c = running count of confident (>= 0.95) predictions of class c over the
labeled and unlabeled predictions (from iteration 0, never reset; a buffer of the network, so
evaluation uses it too).

Loss (the released ``cross_graph_all.py``): for every level Z0..ZK, CE on the labeled batch plus
w * CE on the strong unlabeled view against the network's own weak-view labels (arg-max of the
up-sampled Z_K, no grad; w = fraction of pixels with confidence >= 0.968); for every level F0..FK,
``mllc_proto_weight`` x (CE of 10 cos(f, prototype_c) on both batches) once ``mllc_proto_start`` of
the run has passed.

Our choices where the release is incomplete (its ``PrototypeMemory`` is missing): one prototype
memory per level (the release sends all three updates to the first), each class's prototype
starting at its first batch mean and then an EMA with momentum 0.99 of the batch means over the
labeled (GT) and unlabeled (pseudo-label) pixels, updated after the loss reads it. The intra-image
affinity loss (BCE between the clamped cosine of two pixels' embeddings and whether their labels
agree), commented out in the release, is our reading of the paper's intra-image SLG term: weight
``mllc_affinity_weight`` (0.1; 0 = the release) on every level, both batches. The EMA model of the
release is never used, so there is none; the evaluated network is the student with its graph
layers. Strong view: photometric jitter, blur and CutMix with the next image (the release uses
ClassMix on Cityscapes, nothing on VOC). With fewer than 21 pixels per image the graph keeps all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.augment import mix
from ..models.graph_head import CONF, EMBED, MLLCNet
from ..nvtx import nvtx_range
from ..reference.graph import confidence_mask
from .bank import prototypes
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
from .options import FRACTION, INT_AT_LEAST_1, NON_NEGATIVE, Options, option, require

PL_WEIGHT_THRESH = 0.968
PROTO_SCALE = 10.0
PROTO_MOMENTUM = 0.99


@torch.no_grad()
def count_confident(counts: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor | None = None,
                    reduce=None) -> None:
    """Add to ``counts`` float64 [C] the batch's confident (>= 0.95) pixels per predicted class, of
    ``logits`` float [B, C, H, W] where ``valid`` bool [B, H, W]; ``reduce``: sum over DDP ranks."""
    conf, pred = pseudo_label(logits)
    keep = conf >= CONF
    if valid is not None:
        keep = keep & valid
    batch = torch.zeros_like(counts)
    batch.index_add_(0, pred.reshape(-1), keep.reshape(-1).to(counts.dtype))
    counts += batch if reduce is None else reduce(batch)


def proto_ce(f: torch.Tensor, labels: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
    """CE over classes of 10 cos(f_p, prototype_c), float32 []; ``f`` float [B, D, h, w], ``labels``
    int64 [B, h, w] (255 ignored), ``proto`` float32 [C, D]."""
    logits = PROTO_SCALE * F.normalize(to_rows(f.float()), dim=1) @ F.normalize(proto, dim=1).T
    return supervised_ce(logits, labels.reshape(-1))


def affinity_bce(f: torch.Tensor, labels: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Mean BCE between clamp(cos(f_i, f_j), eps, 1 - eps) and [y_i = y_j] over the valid pixel
    pairs of each image, float32 []; ``f`` float [B, D, h, w], ``labels`` int64 [B, h, w] (written
    out: ``binary_cross_entropy`` refuses autocast)."""
    z = F.normalize(f.float().flatten(2), dim=1)
    sim = (z.transpose(1, 2) @ z).clamp(eps, 1 - eps)
    y = labels.flatten(1)
    same = (y.unsqueeze(2) == y.unsqueeze(1)).float()
    pair = ((y != IGNORE).unsqueeze(2) & (y != IGNORE).unsqueeze(1)).float()
    bce = -(same * sim.log() + (1 - same) * (1 - sim).log())
    return (bce * pair).sum() / pair.sum().clamp(min=1)


@dataclass
class MLLCOptions(Options):
    """``--mllc-*`` (None = the method's default for the data set: the paper's, or the synthetic preset)."""

    mllc_rounds: int | None = option("mllc: graph rounds K", paper=2, check=INT_AT_LEAST_1)
    mllc_official_mask: bool = option("mllc: the official scrambled class-graph mask instead of label equality",
                                      default=False)
    mllc_batch_graph: bool = option("mllc: one graph over all pixels of the batch (inter-image) instead of one per "
                                    "image", default=False)
    mllc_proto_weight: float | None = option("mllc: weight of the prototype (inter-image SLG) loss", paper=0.1,
                                             check=NON_NEGATIVE)
    mllc_proto_start: float | None = option("mllc: fraction of the run before the prototype loss starts",
                                            paper=2000 / 160000, check=FRACTION)
    mllc_affinity_weight: float | None = option("mllc: weight of the intra-image affinity BCE (commented out in the "
                                                "code; 0 = official)", paper=0.1, check=NON_NEGATIVE)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        require(cfg, not (cfg.mllc_batch_graph and cfg.mllc_official_mask), "mllc_batch_graph",
                "the official class-graph layout (--mllc-official-mask) is per image; use one of the two")


class MLLC(Method):
    name = "mllc"
    ARCH = "deeplabv2"
    OPTIONS = MLLCOptions
    SYNTHETIC = {"mllc_proto_start": 0.1}
    SWITCHES = {"proto_on": "the prototype loss (after --mllc-proto-start)"}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.student = MLLCNet(self.build_network(rep_head="mllc"), num_classes, cfg.mllc_rounds,
                               cfg.mllc_official_mask, cfg.mllc_batch_graph)
        levels = cfg.mllc_rounds + 1
        self.register_buffer("proto", torch.zeros(levels, num_classes, EMBED))
        self.register_buffer("proto_seen", torch.zeros(levels, num_classes, dtype=torch.bool))

    @torch.no_grad()
    def augment(self, batch: Batch, generator: torch.Generator) -> Batch:
        x_u = batch["x_u"]
        h, w = x_u.shape[-2:]
        # the network labels its own weak view (eval mode, no grad), as the release does
        with nvtx_range("teacher"):
            self.student.eval()
            logits_w = upsample(self.student(x_u)["logits"], (h, w))
            self.student.train()
        valid = ~batch["pad_u"]
        count_confident(self.student.class_counts, logits_w, valid, reduce=self.dist.all_reduce_sum)
        conf, pl = pseudo_label(logits_w)
        batch["x_s"], box = strong_cutmix_view(x_u, generator)
        valid = mix(valid, valid.roll(1, 0), box)
        batch["conf"] = mix(conf, conf.roll(1, 0), box)
        batch["pl"] = torch.where(valid, mix(pl, pl.roll(1, 0), box), IGNORE)
        batch["valid"] = valid
        return batch

    def losses(self, batch: Batch, progress):
        cfg = self.cfg
        x_l, y_l, x_s, pl = batch["x_l"], batch["y_l"], batch["x_s"], batch["pl"]
        n_l, size = x_l.shape[0], y_l.shape[-2:]
        with nvtx_range("student"):
            levels = self.student(torch.cat((x_l, x_s)))["levels"]
        weight = confident_fraction(batch["conf"], PL_WEIGHT_THRESH, batch["valid"])
        proto_on = (progress >= cfg.mllc_proto_start).float()
        zero = weight.new_zeros(())
        terms = {"x": zero, "u": zero, "proto": zero, "aff": zero}
        new_proto, new_seen = [], []
        with nvtx_range("loss"):
            for level, (z, f) in enumerate(levels):
                logits_l, logits_u = upsample(z, size).split([n_l, x_s.shape[0]])
                terms["x"] = terms["x"] + supervised_ce(logits_l, y_l)
                terms["u"] = terms["u"] + weight * supervised_ce(logits_u, pl)
                labels = downsample_nearest(torch.cat((y_l, pl)), f.shape[-2:])
                terms["proto"] = terms["proto"] + proto_ce(f, labels, self.proto[level])
                if cfg.mllc_affinity_weight > 0:
                    terms["aff"] = terms["aff"] + affinity_bce(f, labels)
                with torch.no_grad():
                    mean, present = prototypes(to_rows(f.detach().float()), labels.reshape(-1), self.num_classes,
                                               reduce=self.dist.all_reduce_sum)
                    old, seen = self.proto[level], self.proto_seen[level].unsqueeze(1)
                    ema = torch.where(seen, PROTO_MOMENTUM * old + (1 - PROTO_MOMENTUM) * mean, mean)
                    new_proto.append(torch.where(present.unsqueeze(1), ema, old))
                    new_seen.append(present)
            with torch.no_grad():
                count_confident(self.student.class_counts, upsample(levels[-1][0][:n_l], size), y_l != IGNORE,
                                reduce=self.dist.all_reduce_sum)
                self.proto.copy_(torch.stack(new_proto))
                self.proto_seen.logical_or_(torch.stack(new_seen))
        loss = (terms["x"] + terms["u"] + cfg.mllc_proto_weight * proto_on * terms["proto"]
                + cfg.mllc_affinity_weight * terms["aff"])
        return {"loss": loss, **{f"loss_{k}": v.detach() for k, v in terms.items()},
                "pl_weight": weight.detach(), "proto_on": proto_on}

    def is_confident(self, prob, valid):
        # MLLC trains on every pixel, weighted by the share that reaches this confidence
        return (prob.amax(1) >= PL_WEIGHT_THRESH) & valid

    def report_extras(self, out, prob, valid):
        """The labels before the graph rounds (scored like the pseudo-labels, which come after them:
        the two accuracies show what label propagation adds), the share of nodes whose own label the
        graph keeps (eta-gated confidence) and the class graph's mean degree as a share of the image."""
        z0 = out["levels"][0][0].float()
        first = upsample(z0, prob.shape[-2:]).argmax(1)
        nodes = z0.flatten(2).transpose(1, 2)  # [B, h w, C]
        keep, label = confidence_mask(nodes, self.student.eta(), CONF)
        same = (label.unsqueeze(2) == label.unsqueeze(1)).float().mean((1, 2))
        return {"pred/before_graph": first, "graph_kept": keep.float().mean(), "graph_degree": same.mean()}
