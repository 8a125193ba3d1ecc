"""Plain-torch segmentation models: dilated ResNet trunks, DeepLabV3+ (UniMatch / U2PL decoders)
and DeepLabV2 with the CTT/MLLC head.

All models take images float [B, 3, H, W] in [0, 1] (they normalise with ImageNet statistics
themselves), are called as ``model(x, need_fp=False)`` and return a dict with ``"logits"`` at
the decoder's resolution (1/4 for DeepLabV3+, 1/8 for DeepLabV2 at OS 8; never up-sampled),
plus ``"rep"`` when there is a representation head, ``"aux"`` for the U2PL auxiliary head, and
``"<key>_fp"`` for every decoder output when ``need_fp`` is set.  ``backbone_parameters()`` and
``head_parameters()`` split the parameters for the head learning-rate multiplier.

``build_model`` is the one entry point; each ``arch`` is a preset of the official configuration,
and ``None`` arguments take the preset's value:

    arch                 output_stride  multi_grid  ceil_mode  head
    deeplabv3plus        16             none        False      UniMatch decoder (spec 4)
    deeplabv3plus_u2pl   8              (2, 2, 4)   True       U2PL decoder (spec 1)
    deeplabv2            8              none        True       CTT Classifier_Module2 (spec 2, 3)

ASPP rates default to the DeepLab rule for the output stride: (12, 24, 36) at 8, (6, 12, 18) at
16, (3, 6, 9) at 32 - the UniMatch and U2PL values at their strides.  The official configs use
the deep stem for ResNet-50/101 (``deep_stem=True``) with deep-stem ImageNet files; the default
here is the 7x7 stem so that torchvision files load strictly.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from torch import nn

from .deeplabv2 import REPS, ClassifierModule2, DeepLabV2
from .deeplabv3plus import ASPP, DECODERS, DeepLabV3Plus, SegmentationModel
from .resnet import DEPTHS, OUTPUT_STRIDES, BasicBlock, Bottleneck, ResNet
from .weights import load_backbone_weights

__all__ = [
    "MODELS", "BACKBONES", "OUTPUT_STRIDES", "DECODERS", "REPS", "build_model", "load_backbone_weights",
    "ResNet", "BasicBlock", "Bottleneck", "DeepLabV3Plus", "DeepLabV2", "ASPP", "ClassifierModule2",
    "SegmentationModel", "DEPTHS",
]

MODELS = ("deeplabv3plus", "deeplabv3plus_u2pl", "deeplabv2")
BACKBONES = ("resnet18", "resnet50", "resnet101")

_PRESETS = {
    "deeplabv3plus": {"output_stride": 16, "multi_grid": None, "ceil_mode": False},
    "deeplabv3plus_u2pl": {"output_stride": 8, "multi_grid": (2, 2, 4), "ceil_mode": True},
    "deeplabv2": {"output_stride": 8, "multi_grid": None, "ceil_mode": True},
}
_ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def build_model(arch: str, num_classes: int, backbone: str = "resnet18", output_stride: int | None = None,
                deep_stem: bool = False, pretrained: str | os.PathLike | None = None,
                rep_head: bool | str = False, *, rep_dim: int = 256, multi_grid: Sequence[int] | None = None,
                aspp_dilations: Sequence[int] | None = None, aux_head: bool = False, fp_dropout: float = 0.5,
                ceil_mode: bool | None = None, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                pretrained_strict: bool = True) -> SegmentationModel:
    """Build a segmentation model from names.

    Args:
        arch: one of ``MODELS``.
        num_classes: C.
        backbone: one of ``BACKBONES``.
        output_stride: 8, 16 or 32; None takes the arch preset.
        deep_stem: three 3x3 convs instead of the 7x7 stem.
        pretrained: local file of backbone weights (see ``load_backbone_weights``); the report is
            kept as ``model.pretrained_report``.
        rep_head: DeepLabV3+: add the representation head.  DeepLabV2: ``"ctt"`` (or True),
            ``"mllc"``, or False/None for logits only.
        rep_dim: DeepLabV3+ representation width (DeepLabV2's is fixed at 256).
        multi_grid: layer4 per-block dilation factors; None takes the preset, (1, 1, 1) disables.
        aspp_dilations: DeepLabV3+ ASPP rates; None follows the output stride.
        aux_head: DeepLabV3+ auxiliary classifier on layer3 (U2PL Cityscapes).
        fp_dropout: UniMatch feature-perturbation dropout rate.
        ceil_mode: stem max-pool rounding; None takes the preset.
        norm_layer: normalisation of the backbone (heads keep BatchNorm / GroupNorm).
        pretrained_strict: raise unless the file fits the backbone exactly.
    """
    if arch not in MODELS:
        raise ValueError(f"arch must be one of {MODELS}, got {arch!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    preset = _PRESETS[arch]
    output_stride = preset["output_stride"] if output_stride is None else output_stride
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")

    trunk = ResNet(
        depth=int(backbone[len("resnet"):]),
        deep_stem=deep_stem,
        output_stride=output_stride,
        multi_grid=preset["multi_grid"] if multi_grid is None else multi_grid,
        norm_layer=norm_layer,
        ceil_mode=preset["ceil_mode"] if ceil_mode is None else ceil_mode,
    )

    if arch == "deeplabv2":
        if rep_head is True:
            rep_head = "ctt"
        rep = None if rep_head is False or rep_head is None else rep_head
        if rep not in REPS:
            raise ValueError(f"rep_head for deeplabv2 must be True, False, None, 'ctt' or 'mllc', got {rep_head!r}")
        if aux_head or aspp_dilations is not None:
            raise ValueError("aux_head and aspp_dilations apply to the deeplabv3plus archs only")
        model = DeepLabV2(trunk, num_classes, rep=rep, fp_dropout=fp_dropout)
    else:
        if not isinstance(rep_head, bool):
            raise ValueError(f"rep_head for {arch} must be a bool, got {rep_head!r}")
        model = DeepLabV3Plus(
            trunk, num_classes,
            decoder="u2pl" if arch == "deeplabv3plus_u2pl" else "unimatch",
            aspp_dilations=_ASPP_RATES[output_stride] if aspp_dilations is None else aspp_dilations,
            rep_head=rep_head, rep_dim=rep_dim, fp_dropout=fp_dropout, aux_head=aux_head,
        )

    model.pretrained_report = None
    if pretrained is not None:
        model.pretrained_report = load_backbone_weights(model.backbone, pretrained, strict=pretrained_strict)
    return model
