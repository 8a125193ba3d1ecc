"""Dilated ResNet-18/50/101 backbones for segmentation, in plain torch.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
...) so a torchvision ImageNet state dict loads unchanged; there is no ``fc`` layer.

Choices the method specs leave open, and why:

* Deep stem ("ResNet-C", U2PL and UniMatch): ``conv1`` becomes an ``nn.Sequential`` of
  ``conv 3->64 s2, BN, ReLU, conv 64->64, BN, ReLU, conv 64->128`` (keys ``conv1.0``, ``conv1.1``,
  ``conv1.3``, ``conv1.4``, ``conv1.6``) and the third conv's BN is the outer ``bn1`` (128 ch).  This
  is the naming of both official repositories, so their deep-stem ImageNet files load as they are,
  and it can never be confused with torchvision's single 7x7 ``conv1.weight``.
* ``ceil_mode`` of the stem max-pool: U2PL (deep stem) and CTT/MLLC (7x7 stem) use ``True``,
  UniMatch and torchvision ``False``.  The two differ only for even feature sizes (a 256x512 crop
  gives 33x65 logits at 1/8 with ``True``, 32x64 with ``False``), so it is an argument; ``None``
  picks ``True`` for the deep stem and ``False`` for the 7x7 stem.
* Dilation replaces stride the torchvision way: in a dilated layer the first block keeps the
  dilation of the layer before it and the others use the new one.  ``multi_grid`` then multiplies
  layer4's per-block dilations, exactly as U2PL/UniMatch do: OS 8 with ``(2, 2, 4)`` gives layer4
  dilations ``(2*2, 4*2, 4*4) = (4, 8, 16)``.  ResNet-18's layer4 has two blocks and uses the first
  two factors.
* BasicBlock (ResNet-18) dilates both of its 3x3 convs, so its receptive field grows like the
  strided network it replaces; torchvision refuses dilation there, the weights are the same.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "DEPTHS", "OUTPUT_STRIDES"]

DEPTHS = (18, 50, 101)
OUTPUT_STRIDES = (8, 16, 32)

NormLayer = Callable[[int], nn.Module]


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float [B, inplanes, H, W] -> float [B, planes, H/stride, W/stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float [B, inplanes, H, W] -> float [B, 4 * planes, H/stride, W/stride]."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_ARCH = {
    18: (BasicBlock, (2, 2, 2, 2)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}

# Which of layer2, layer3, layer4 trade their stride for dilation.
_DILATE = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


class ResNet(nn.Module):
    """ResNet trunk returning ``[c1, c2, c3, c4]`` (outputs of layer1..layer4).

    Args:
        depth: 18, 50 or 101.
        deep_stem: three 3x3 convs instead of the 7x7 conv (see the module docstring for names).
        output_stride: 8, 16 or 32; the stride of ``c4``.  16 dilates layer4, 8 layer3 and layer4.
        multi_grid: three positive factors multiplying layer4's per-block dilation, or None.
        norm_layer: called with a channel count; BatchNorm2d by default.
        ceil_mode: stem max-pool rounding; None means ``deep_stem``.

    Attributes: ``channels`` (channel counts of c1..c4), ``output_stride``, ``depth``, ``deep_stem``.
    """

    def __init__(self, depth: int = 50, deep_stem: bool = False, output_stride: int = 32,
                 multi_grid: Sequence[int] | None = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 ceil_mode: bool | None = None):
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
        if output_stride not in _DILATE:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        if multi_grid is not None:
            multi_grid = tuple(multi_grid)
            if len(multi_grid) != 3 or not all(isinstance(g, int) and g >= 1 for g in multi_grid):
                raise ValueError(f"multi_grid must be three positive ints or None, got {multi_grid!r}")
        block, counts = _ARCH[depth]
        self.depth = depth
        self.deep_stem = bool(deep_stem)
        self.output_stride = output_stride
        self.multi_grid = multi_grid

        if self.deep_stem:
            self.conv1 = nn.Sequential(
                _conv3x3(3, 64, stride=2), norm_layer(64), nn.ReLU(inplace=True),
                _conv3x3(64, 64), norm_layer(64), nn.ReLU(inplace=True),
                _conv3x3(64, 128),
            )
            stem_channels = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            stem_channels = 64
        self.bn1 = norm_layer(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        pool_ceil = self.deep_stem if ceil_mode is None else bool(ceil_mode)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=pool_ceil)

        self._inplanes = stem_channels
        self._dilation = 1
        dilate = _DILATE[output_stride]
        self.layer1 = self._make_layer(block, 64, counts[0], 1, False, norm_layer)
        self.layer2 = self._make_layer(block, 128, counts[1], 2, dilate[0], norm_layer)
        self.layer3 = self._make_layer(block, 256, counts[2], 2, dilate[1], norm_layer)
        self.layer4 = self._make_layer(block, 512, counts[3], 2, dilate[2], norm_layer, multi_grid)
        self.channels = [p * block.expansion for p in (64, 128, 256, 512)]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int,
                    dilate: bool, norm_layer: NormLayer,
                    multi_grid: tuple[int, ...] | None = None) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        dilations = [previous_dilation] + [self._dilation] * (blocks - 1)
        if multi_grid is not None:
            # ResNet-18's layer4 has two blocks: it takes the first two factors.
            dilations = [d * g for d, g in zip(dilations, multi_grid, strict=False)]

        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_channels:
            downsample = nn.Sequential(_conv1x1(self._inplanes, out_channels, stride),
                                       norm_layer(out_channels))
        layers = [block(self._inplanes, planes, stride, dilations[0], downsample, norm_layer)]
        self._inplanes = out_channels
        for d in dilations[1:]:
            layers.append(block(out_channels, planes, 1, d, None, norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` float [B, 3, H, W] (normalised) -> ``[c1, c2, c3, c4]``, c_i float [B, channels[i-1],
        H/s_i, W/s_i] at strides s = 4, 8, min(16, output_stride), output_stride (sizes rounded up)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]
