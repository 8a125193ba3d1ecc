"""DeepLabV3+ with the UniMatch decoder (spec section 4) or the U2PL decoder (spec section 1).

Every segmentation model here takes images in [0, 1] and applies the ImageNet normalisation
itself, so the augmentation code never needs to know about it, and returns a dict:

* ``"logits"``: float [B, C, h, w] at the decoder's resolution (1/4 here), not up-sampled;
* ``"rep"``: float [B, rep_dim, h, w] when the model has a representation head (not normalised here);
* ``"aux"``: float [B, C, h3, w3] from the optional U2PL auxiliary head on layer3;
* ``"logits_fp"`` (and ``"rep_fp"``): the feature-perturbed half when ``need_fp=True``.

Choices the spec leaves open, and why:

* ASPP branches are 256 wide whatever the backbone.  UniMatch writes ``in_channels // 8``, which
  is 256 for ResNet-50/101, and U2PL fixes 256; keeping 256 lets ResNet-18 test models share it.
* UniMatch's ASPP projection is 1x1 1280->256 + BN + ReLU with *no* dropout (the torchvision
  DeepLab projection has Dropout(0.5); UniMatch does not), so there is none here.  U2PL's ASPP has
  no projection at all: its 1280 channels go straight into a 3x3 conv ->256 + BN + ReLU +
  Dropout2d(0.1), as in the official ``dec_deeplabv3_plus``.
* The image-pooling branch is broadcast instead of bilinearly up-sampled from 1x1, which is
  the same values without the interpolation kernel.
* The feature perturbation is ``F.dropout2d(..., training=True)``: UniMatch builds a fresh
  ``nn.Dropout2d(0.5)`` inside ``forward``, which is always in training mode, so the perturbation
  is applied in ``eval()`` too.  Decoder BatchNorm sees the doubled batch, as in UniMatch.
* Head layers keep PyTorch's default initialisation, as both official repositories do; the
  backbone uses Kaiming init (or the pre-trained file).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import ResNet

__all__ = ["DeepLabV3Plus", "ASPP", "SegmentationModel", "DECODERS", "IMAGENET_MEAN", "IMAGENET_STD"]

DECODERS = ("unimatch", "u2pl")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_backbone(backbone: object) -> None:
    if not isinstance(backbone, ResNet):
        raise TypeError(f"backbone must be a semiseg_fast.models.ResNet, got {type(backbone).__name__}")


def _check_num_classes(num_classes: object) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _check_fp_dropout(p: object) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"fp_dropout must be a probability in [0, 1), got {p!r}")


class SegmentationModel(nn.Module):
    """Shared plumbing: input normalisation, the backbone/head parameter split, fp halves.

    Subclasses set ``self.backbone`` (a ResNet); every other parameter counts as head.
    """

    def __init__(self) -> None:
        super().__init__()
        # Non-persistent: they are constants, and keeping them out of the state dict keeps
        # checkpoints loadable if the constants ever change.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float [B, 3, H, W] in [0, 1] -> ImageNet-normalised float [B, 3, H, W]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be [B, 3, H, W] images in [0, 1], got shape {tuple(x.shape)}")
        return (x - self.pixel_mean) / self.pixel_std

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    @staticmethod
    def _split_fp(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        split = {}
        for key, value in out.items():
            split[key], split[key + "_fp"] = value.chunk(2)
        return split


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1, bias: bool = False) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=bias),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per dilation, image pooling.

    With ``project`` (UniMatch) the concatenation is reduced to ``width`` channels by a 1x1 conv;
    without it (U2PL) the output has ``(len(dilations) + 2) * width`` channels.
    """

    def __init__(self, in_channels: int, dilations: Sequence[int], width: int = 256, project: bool = True):
        super().__init__()
        dilations = tuple(dilations)
        if not dilations or not all(isinstance(d, int) and d >= 1 for d in dilations):
            raise ValueError(f"aspp_dilations must be positive ints, got {dilations!r}")
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, width, 1)] + [_conv_bn_relu(in_channels, width, 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, width, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        concat = (len(dilations) + 2) * width
        self.project = _conv_bn_relu(concat, width, 1) if project else None
        self.out_channels = width if project else concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float [B, in_channels, h, w] -> float [B, out_channels, h, w]."""
        feats = [branch(x) for branch in self.branches]
        feats.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        y = torch.cat(feats, dim=1)
        return y if self.project is None else self.project(y)


def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)


class UniMatchDecoder(nn.Module):
    """c1 -> 48 ch; ASPP(c4) up-sampled to c1; two 3x3 fuse convs; 1x1 classifier (spec section 4)."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int,
                 dilations: Sequence[int], rep_dim: int | None):
        super().__init__()
        self.aspp = ASPP(high_channels, dilations, project=True)
        self.reduce = _conv_bn_relu(low_channels, 48, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(48 + self.aspp.out_channels, 256, 3),
                                  _conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.representation = None
        if rep_dim is not None:
            self.representation = nn.Sequential(_conv_bn_relu(256, 256, 3), nn.Conv2d(256, rep_dim, 1))

    def forward(self, c1: torch.Tensor, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``c1`` float [B, low_channels, h, w], ``c4`` float [B, high_channels, h4, w4] -> (logits
        float [B, C, h, w], rep float [B, rep_dim, h, w] or None)."""
        high = _upsample_to(self.aspp(c4), c1)
        feat = self.fuse(torch.cat((self.reduce(c1), high), dim=1))
        rep = None if self.representation is None else self.representation(feat)
        return self.classifier(feat), rep


def _u2pl_head(out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        _conv_bn_relu(512, 256, 3, bias=True), nn.Dropout2d(0.1),
        _conv_bn_relu(256, 256, 3, bias=True), nn.Dropout2d(0.1),
        nn.Conv2d(256, out_channels, 1),
    )


class U2PLDecoder(nn.Module):
    """U2PL's ``dec_deeplabv3_plus`` (spec section 1): 512-ch fusion, classifier and rep heads."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int,
                 dilations: Sequence[int], rep_dim: int | None):
        super().__init__()
        self.aspp = ASPP(high_channels, dilations, project=False)
        self.head = nn.Sequential(_conv_bn_relu(self.aspp.out_channels, 256, 3), nn.Dropout2d(0.1))
        self.low_conv = _conv_bn_relu(low_channels, 256, 1, bias=True)
        self.classifier = _u2pl_head(num_classes)
        self.representation = None if rep_dim is None else _u2pl_head(rep_dim)

    def forward(self, c1: torch.Tensor, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``c1`` float [B, low_channels, h, w], ``c4`` float [B, high_channels, h4, w4] -> (logits
        float [B, C, h, w], rep float [B, rep_dim, h, w] or None)."""
        high = _upsample_to(self.head(self.aspp(c4)), c1)
        feat = torch.cat((self.low_conv(c1), high), dim=1)
        rep = None if self.representation is None else self.representation(feat)
        return self.classifier(feat), rep


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+ on a :class:`ResNet`; logits at the stride of ``c1`` (1/4).

    Args:
        backbone: the trunk; its ``c1`` and ``c4`` feed the decoder.
        num_classes: C.
        decoder: ``"unimatch"`` or ``"u2pl"``.
        aspp_dilations: ASPP rates; (6, 12, 18) suits OS 16, (12, 24, 36) OS 8.
        rep_head: add a representation head (``"rep"`` output, not normalised).
        rep_dim: its channel count.
        fp_dropout: channel-dropout rate of UniMatch's feature perturbation (``need_fp``).
        aux_head: U2PL's Cityscapes auxiliary classifier on ``c3`` (3x3 ->256, BN, ReLU,
            Dropout2d 0.1, 1x1 ->C); output ``"aux"`` at the stride of ``c3``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, decoder: str = "unimatch",
                 aspp_dilations: Sequence[int] = (6, 12, 18), rep_head: bool = False,
                 rep_dim: int = 256, fp_dropout: float = 0.5, aux_head: bool = False):
        super().__init__()
        _check_backbone(backbone)
        _check_num_classes(num_classes)
        _check_fp_dropout(fp_dropout)
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if rep_head and (not isinstance(rep_dim, int) or rep_dim < 1):
            raise ValueError(f"rep_dim must be a positive int, got {rep_dim!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder_name = decoder
        self.fp_dropout = float(fp_dropout)
        self.rep_dim = rep_dim if rep_head else None
        self.logits_stride = 4
        low, high = backbone.channels[0], backbone.channels[3]
        decoder_cls = UniMatchDecoder if decoder == "unimatch" else U2PLDecoder
        self.decoder = decoder_cls(low, high, num_classes, aspp_dilations, self.rep_dim)
        self.aux = None
        if aux_head:
            self.aux = nn.Sequential(_conv_bn_relu(backbone.channels[2], 256, 3, bias=True), nn.Dropout2d(0.1),
                                     nn.Conv2d(256, num_classes, 1))

    def forward(self, x: torch.Tensor, need_fp: bool = False) -> dict[str, torch.Tensor]:
        """``x`` float [B, 3, H, W] in [0, 1] -> a dict with ``logits`` float [B, C, H/4, W/4],
        ``rep`` float [B, rep_dim, H/4, W/4] with ``rep_head``, with ``need_fp`` ``logits_fp`` /
        ``rep_fp`` of the same shapes, and ``aux`` float [B, C, H/s3, W/s3] (stride of ``c3``) with
        ``aux_head``."""
        feats = self.backbone(self.normalize(x))
        c1, c4 = feats[0], feats[3]
        if need_fp:
            c1 = torch.cat((c1, F.dropout2d(c1, self.fp_dropout, training=True)))
            c4 = torch.cat((c4, F.dropout2d(c4, self.fp_dropout, training=True)))
        logits, rep = self.decoder(c1, c4)
        out = {"logits": logits}
        if rep is not None:
            out["rep"] = rep
        if need_fp:
            out = self._split_fp(out)
        if self.aux is not None:
            out["aux"] = self.aux(feats[2])
        return out
