"""DeepLabV2 with the CTT/MLLC head ``Classifier_Module2`` (spec sections 2 and 3).

Read from the authors' ``model/deeplabv2.py`` (SSL_CTT @33d7e3c, MLLC @c1eec8a):

* five branches on c4 (1x1 and 3x3 with dilations 6, 12, 18, 24), each conv ->256 (bias) +
  GroupNorm(32) + ReLU; concatenation (1280 ch); squeeze-excitation on the 1280 channels with
  reduction 16 (global average pool, Linear 1280->80, ReLU, Linear 80->1280, sigmoid);
  3x3 conv 1280->256 (bias) + GroupNorm(32), **no ReLU** after it (the official
  ``bottleneck`` ends at the GroupNorm); Dropout2d(0.1); 1x1 conv 256->out without bias.
* CTT: ``feat`` = L2-normalised dropped-out 256-d features, ``out`` = the 1x1 classifier on the
  same dropped-out features (one dropout mask for both).
* MLLC: a second ``Classifier_Module2`` (``layer6``) with 256 outputs; its 1x1 output is the
  embedding F0 (not normalised) and ``layer5``'s output is Z0.  The graph layers (G2Net) belong to
  the MLLC method, not here.

Not copied from the official code: its head initialisation is undone by the ResNet init loop that
runs after it (every conv ends up N(0, 0.01)); we state that result directly: head convs
N(0, 0.01) with zero bias, SE linears PyTorch default.  The official trunk puts layer2's stride on
the 1x1 conv (v1, matching the COCO DeepLab weights) and gives the first block of layer3/layer4
the new dilation; our trunk is the torchvision v1.5 ResNet (stride on the 3x3, first block keeps
the previous dilation), which has the same parameters and output sizes.  ``need_fp`` is our
addition, for running UniMatch on this model: only c4 feeds the head, so only c4 is perturbed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .deeplabv3plus import SegmentationModel, _check_backbone, _check_fp_dropout, _check_num_classes
from .resnet import ResNet

__all__ = ["DeepLabV2", "ClassifierModule2", "SEBlock", "REPS"]

REPS = ("ctt", "mllc", None)


class SEBlock(nn.Module):
    """Squeeze-excitation: channel gates from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float [B, channels, H, W] -> the gated float [B, channels, H, W]."""
        gates = self.fc(x.mean(dim=(2, 3)))
        return x * gates[:, :, None, None]


def _conv_gn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation),
                         nn.GroupNorm(32, cout), nn.ReLU(inplace=True))


class ClassifierModule2(nn.Module):
    """The CTT head; ``forward`` returns ``(features, out)``: the 256-d dropped-out features and
    the 1x1 output (``out_channels`` wide)."""

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (6, 12, 18, 24),
                 width: int = 256, dropout: float = 0.1, se_reduction: int = 16):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_gn_relu(in_channels, width, 1)] + [_conv_gn_relu(in_channels, width, 3, d) for d in dilations])
        concat = width * (len(dilations) + 1)
        self.se = SEBlock(concat, se_reduction)
        self.bottleneck = nn.Sequential(nn.Conv2d(concat, width, 3, padding=1), nn.GroupNorm(32, width))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, out_channels, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float [B, in_channels, h, w] -> ``(features, out)``: float [B, width, h, w] and
        float [B, out_channels, h, w]."""
        y = torch.cat([branch(x) for branch in self.branches], dim=1)
        feat = self.dropout(self.bottleneck(self.se(y)))
        return feat, self.classifier(feat)


class DeepLabV2(SegmentationModel):
    """DeepLabV2 (CTT/MLLC): logits at the stride of ``c4`` (1/8 with the usual OS-8 trunk).

    Args:
        backbone: the trunk; only ``c4`` is used.
        num_classes: C.
        rep: ``"ctt"``: ``"rep"`` = L2-normalised 256-d features of the classifier head;
            ``"mllc"``: ``"rep"`` = 256-d output of a second head ``layer6``, not normalised;
            ``None``: logits only.
        fp_dropout: channel-dropout rate on c4 for ``need_fp``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, rep: str | None = "ctt", fp_dropout: float = 0.5):
        super().__init__()
        _check_backbone(backbone)
        _check_num_classes(num_classes)
        _check_fp_dropout(fp_dropout)
        if rep not in REPS:
            raise ValueError(f"rep must be one of {REPS}, got {rep!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.rep = rep
        self.rep_dim = None if rep is None else 256
        self.fp_dropout = float(fp_dropout)
        self.logits_stride = backbone.output_stride
        self.layer5 = ClassifierModule2(backbone.channels[3], num_classes)
        self.layer6 = ClassifierModule2(backbone.channels[3], 256) if rep == "mllc" else None

    def forward(self, x: torch.Tensor, need_fp: bool = False) -> dict[str, torch.Tensor]:
        """``x`` float [B, 3, H, W] in [0, 1] -> a dict with ``logits`` float [B, C, H/s, W/s]
        (s = ``logits_stride``), ``rep`` float [B, 256, H/s, W/s] with ``rep``, and with ``need_fp``
        ``logits_fp`` / ``rep_fp`` of the same shapes."""
        c4 = self.backbone(self.normalize(x))[3]
        if need_fp:
            c4 = torch.cat((c4, F.dropout2d(c4, self.fp_dropout, training=True)))
        feat, logits = self.layer5(c4)
        out = {"logits": logits}
        if self.rep == "ctt":
            out["rep"] = F.normalize(feat, dim=1)
        elif self.rep == "mllc":
            out["rep"] = self.layer6(c4)[1]
        if need_fp:
            out = self._split_fp(out)
        return out
