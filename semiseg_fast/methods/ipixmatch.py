"""IPixMatch (spec section 4): UniMatch plus alpha(t) * L_IPix, the spatial-softmax KL between the
teacher's and the student's per-class distributions over the confident pixels.

Our choices where the paper is silent (spec section 4 and issue text):
* teacher logits p = the detached weak-view logits, cut-mixed with the mix batch's logits inside
  each strong view's box, exactly like the pseudo-labels; student q = each strong view's logits;
  L_IPix is the mean over the two strong views;
* Omega = teacher channel-softmax max > tau (0.8) and not a padded pixel; an image with |Omega| < 2
  contributes 0; the loss is the mean over images (``ops.spatial_kl``);
* alpha = ``ipix_weight`` * exp(-5 (1 - t / t_w)^2) for t < t_w, with t_w = ``ipix_warmup`` of the
  run (1/16: the paper's 5 of 80 VOC epochs), then ``ipix_weight``;
* logits are up-sampled bilinearly (align_corners=True) as in UniMatch; the IPixMatch authors used
  nearest up-sampling in their runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..data.augment import mix
from ..nvtx import nvtx_range
from .options import FRACTION, NON_NEGATIVE, POSITIVE, Options, option
from .unimatch import WEIGHTS, UniMatch


@dataclass
class IPixMatchOptions(Options):
    """``--ipix-*``."""

    ipix_weight: float = option("ipixmatch: weight alpha of the spatial KL term", default=1.0, check=NON_NEGATIVE)
    ipix_warmup: float = option("ipixmatch: fraction of the run over which alpha ramps up", default=0.0625,
                                check=FRACTION)
    ipix_temperature: float = option("ipixmatch: softmax temperature over pixels", default=4.0, check=POSITIVE)
    ipix_tau: float = option("ipixmatch: teacher confidence for the pixel set Omega", default=0.8, check=FRACTION)


def gaussian_rampup(progress: torch.Tensor, warmup: float) -> torch.Tensor:
    """exp(-5 (1 - progress/warmup)^2) before ``warmup``, 1 after, for ``progress`` float32 [] (a
    device tensor, so the schedule never recompiles)."""
    if warmup <= 0:
        return torch.ones_like(progress)
    phase = (progress / warmup).clamp(max=1.0)
    return torch.exp(-5.0 * (1.0 - phase) ** 2)


class IPixMatch(UniMatch):
    name = "ipixmatch"
    OPTIONS = IPixMatchOptions

    def losses(self, batch, progress):
        terms, extras = self.unimatch_losses(batch)
        cfg = self.cfg
        with nvtx_range("loss/ipix"):
            logits_m = batch["logits_m"]
            ipix = []
            for view in ("1", "2"):
                p = mix(extras["logits_w"], logits_m, batch["box" + view])
                _, _, valid = extras["targets"]["s" + view]
                ipix.append(ops.spatial_kl(p, extras["logits_s" + view], temperature=cfg.ipix_temperature,
                                           tau=cfg.ipix_tau, ignore=~valid))
            terms["ipix"] = (ipix[0] + ipix[1]) / 2
        alpha = cfg.ipix_weight * gaussian_rampup(progress, cfg.ipix_warmup)
        loss = sum(WEIGHTS[k] * terms[k] for k in WEIGHTS) + alpha * terms["ipix"]
        out = self.report(loss, terms, extras)
        out["ipix_alpha"] = alpha.detach()
        return out
