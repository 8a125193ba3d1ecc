"""Models: output shapes and strides, dilations, deep stem, feature perturbation, parameter split,
input normalisation, torchvision-named weight loading, and the builder's errors.

Real forwards use ResNet-18 on tiny inputs; the ResNet-50/101 checks and the full-size crops of the
specs run on the meta device, which propagates shapes without computing anything.
"""
import pytest
import torch
import torch.nn.functional as F

from semiseg_fast.models import (
    BACKBONES,
    MODELS,
    DeepLabV2,
    DeepLabV3Plus,
    ResNet,
    build_model,
    load_backbone_weights,
)

B, C = 2, 5


def _half(n: int) -> int:
    """Output size of a stride-2 conv with 'same' padding (3x3 pad 1, 7x7 pad 3, 1x1 pad 0)."""
    return (n - 1) // 2 + 1


def _feature_sizes(n: int, output_stride: int, ceil_mode: bool) -> list[int]:
    n = _half(n)  # stem conv
    n = n // 2 + 1 if ceil_mode else _half(n)  # max-pool 3x3, stride 2, pad 1
    c1 = n
    c2 = _half(c1)
    c3 = c2 if output_stride == 8 else _half(c2)
    c4 = c3 if output_stride in (8, 16) else _half(c3)
    return [c1, c2, c3, c4]


def _dilations(layer) -> list[int]:
    return [block.conv2.dilation[0] for block in layer]


def _torchvision_keys(depth: int) -> set[str]:
    """State-dict names of torchvision's resnet<depth>, without fc (written out independently)."""
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    n_convs = 2 if depth == 18 else 3

    def bn(prefix):
        return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1")]
    for li, count in enumerate(blocks, start=1):
        for b in range(count):
            p = f"layer{li}.{b}"
            for i in range(1, n_convs + 1):
                keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
            if b == 0 and (li > 1 or depth != 18):
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return set(keys)


def _random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v)
        else:
            v = torch.full_like(v, 7)
        state[k] = v
    return state


# ----------------------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("deep_stem", [False, True])
@pytest.mark.parametrize("size", [(33, 33), (40, 27)])
def test_resnet18_feature_shapes(output_stride, deep_stem, size):
    net = ResNet(18, deep_stem=deep_stem, output_stride=output_stride).eval()
    feats = net(torch.rand(B, 3, *size))
    assert net.channels == [64, 128, 256, 512]
    hs = _feature_sizes(size[0], output_stride, ceil_mode=deep_stem)
    ws = _feature_sizes(size[1], output_stride, ceil_mode=deep_stem)
    assert [tuple(f.shape) for f in feats] == [(B, ch, h, w) for ch, h, w in zip(net.channels, hs, ws, strict=True)]


def test_resnet_ceil_mode_only_changes_even_sizes():
    x = torch.rand(1, 3, 64, 65)
    floor = ResNet(18, ceil_mode=False).eval()(x)[0]
    ceil = ResNet(18, ceil_mode=True).eval()(x)[0]
    assert floor.shape[-2:] == (16, 17) and ceil.shape[-2:] == (17, 17)
    assert ResNet(18, deep_stem=True).maxpool.ceil_mode and not ResNet(18).maxpool.ceil_mode


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_resnet_state_dict_names_match_torchvision(depth):
    with torch.device("meta"):
        net = ResNet(depth)
    assert set(net.state_dict()) == _torchvision_keys(depth)


def test_resnet50_101_construction_and_dilations():
    with torch.device("meta"):
        r50 = ResNet(50, output_stride=16)
        r101 = ResNet(101, deep_stem=True, output_stride=8, multi_grid=(2, 2, 4))
        feats = r50(torch.empty(1, 3, 65, 65, device="meta"))
    assert r50.channels == r101.channels == [256, 512, 1024, 2048]
    assert [f.shape[1:] for f in feats] == [(256, 17, 17), (512, 9, 9), (1024, 5, 5), (2048, 5, 5)]
    assert len(r101.layer3) == 23 and r101.layer1[0].conv1.in_channels == 128
    # OS 16: layer4's first block keeps dilation 1 (torchvision), the others use 2.
    assert _dilations(r50.layer3) == [1] * 6 and _dilations(r50.layer4) == [1, 2, 2]
    # OS 8 + multi-grid (2, 2, 4): U2PL's (2*2, 4*2, 4*4).
    assert _dilations(r101.layer3) == [1] + [2] * 22
    assert _dilations(r101.layer4) == [4, 8, 16]
    assert all(b.conv2.padding == b.conv2.dilation for b in r101.layer4)
    assert all(b.conv2.stride == (1, 1) for b in r101.layer4)


def test_resnet18_multi_grid_dilates_both_convs():
    net = ResNet(18, output_stride=16, multi_grid=(1, 2, 4))
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in net.layer4] == [(1, 1), (4, 4)]
    assert all(b.conv1.padding == b.conv1.dilation for b in net.layer4)
    plain = ResNet(18, output_stride=32)
    assert all(m.dilation == (1, 1) for m in plain.modules() if isinstance(m, torch.nn.Conv2d))


def test_resnet_deep_stem_layout():
    net = ResNet(18, deep_stem=True)
    keys = set(net.state_dict())
    assert {"conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight"} <= keys
    assert "conv1.weight" not in keys and net.bn1.num_features == 128
    assert net.conv1[0].stride == (2, 2) and net.conv1[6].out_channels == 128


def test_resnet_init():
    net = ResNet(18)
    assert torch.all(net.bn1.weight == 1) and torch.all(net.bn1.bias == 0)
    # Kaiming fan_out: std = sqrt(2 / (out_channels * k * k)).
    w = net.layer4[1].conv2.weight
    assert abs(w.std().item() - (2 / (512 * 9)) ** 0.5) < 0.002


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": 34}, "depth"),
    ({"output_stride": 4}, "output_stride"),
    ({"multi_grid": (1, 2)}, "multi_grid"),
    ({"multi_grid": (1, 0, 2)}, "multi_grid"),
])
def test_resnet_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet(**kwargs)


# ---------------------------------------------------------------------------------- DeepLabV3+
@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3plus_u2pl"])
def test_deeplabv3plus_shapes(arch, output_stride):
    model = build_model(arch, C, output_stride=output_stride, rep_head=True, rep_dim=24, aux_head=True)
    size = (33, 50)
    out = model(torch.rand(B, 3, *size))
    h = _feature_sizes(size[0], output_stride, ceil_mode=model.backbone.maxpool.ceil_mode)
    w = _feature_sizes(size[1], output_stride, ceil_mode=model.backbone.maxpool.ceil_mode)
    assert set(out) == {"logits", "rep", "aux"}
    assert out["logits"].shape == (B, C, h[0], w[0])  # 1/4, not up-sampled
    assert out["rep"].shape == (B, 24, h[0], w[0])
    assert out["aux"].shape == (B, C, h[2], w[2])
    assert model.logits_stride == 4


def test_deeplabv3plus_without_heads_returns_logits_only():
    out = build_model("deeplabv3plus", C)(torch.rand(B, 3, 33, 33))
    assert set(out) == {"logits"}


def test_decoder_layouts():
    uni = build_model("deeplabv3plus", C, rep_head=True).decoder
    assert uni.aspp.project is not None and uni.aspp.out_channels == 256
    assert uni.reduce[0].out_channels == 48 and uni.fuse[0][0].in_channels == 304
    assert [b[0].dilation[0] for b in uni.aspp.branches[1:]] == [6, 12, 18]
    u2pl = build_model("deeplabv3plus_u2pl", C, rep_head=True).decoder
    assert u2pl.aspp.project is None and u2pl.head[0][0].in_channels == 1280
    assert u2pl.low_conv[0].out_channels == 256 and u2pl.classifier[0][0].in_channels == 512
    assert [b[0].dilation[0] for b in u2pl.aspp.branches[1:]] == [12, 24, 36]
    assert u2pl.representation[-1].out_channels == 256


@pytest.mark.parametrize("arch", MODELS)
def test_need_fp(arch):
    model = build_model(arch, C, rep_head=True).eval()
    x = torch.rand(B, 3, 33, 33)
    out = model(x, need_fp=True)
    assert set(out) == {"logits", "logits_fp", "rep", "rep_fp"}
    assert out["logits_fp"].shape == out["logits"].shape and out["rep_fp"].shape == out["rep"].shape
    # The perturbation is applied in eval mode too (UniMatch builds a fresh, training-mode Dropout2d).
    assert not torch.allclose(out["logits"], out["logits_fp"])
    plain = model(x)
    assert torch.allclose(out["logits"], plain["logits"], atol=1e-5)
    assert torch.allclose(out["rep"], plain["rep"], atol=1e-5)


def test_need_fp_without_dropout_gives_equal_halves():
    model = build_model("deeplabv3plus", C, fp_dropout=0.0).eval()
    out = model(torch.rand(B, 3, 33, 33), need_fp=True)
    assert torch.allclose(out["logits"], out["logits_fp"], atol=1e-6)


def test_need_fp_train_mode_backward():
    model = build_model("deeplabv3plus", C).train()
    out = model(torch.rand(B, 3, 33, 33), need_fp=True)
    (out["logits"].mean() + out["logits_fp"].mean()).backward()
    assert model.backbone.conv1.weight.grad is not None


@pytest.mark.parametrize("arch, rep_head", [
    ("deeplabv3plus", True), ("deeplabv3plus_u2pl", True), ("deeplabv2", "ctt"), ("deeplabv2", "mllc"),
])
def test_parameter_split_is_a_partition(arch, rep_head):
    kwargs = {"aux_head": True} if arch != "deeplabv2" else {}
    model = build_model(arch, C, rep_head=rep_head, **kwargs)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    everything = {id(p) for p in model.parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == everything
    assert len(model.backbone_parameters()) + len(model.head_parameters()) == len(list(model.parameters()))
    assert backbone == {id(p) for p in model.backbone.parameters()}


@pytest.mark.parametrize("arch", MODELS)
def test_normalisation_inside_the_model(arch):
    model = build_model(arch, C).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.equal(model.pixel_mean, mean) and torch.equal(model.pixel_std, std)
    assert not any(k.startswith("pixel_") for k in model.state_dict())
    x = torch.rand(B, 3, 33, 33)
    feats = model.backbone((x - mean) / std)
    if isinstance(model, DeepLabV3Plus):
        manual = model.decoder(feats[0], feats[3])[0]
    else:
        manual = model.layer5(feats[3])[1]
    assert torch.allclose(model(x)["logits"], manual, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(B, 1, 33, 33))


# ------------------------------------------------------------------------------------ DeepLabV2
def test_deeplabv2_heads():
    x = torch.rand(B, 3, 33, 41)
    h, w = _feature_sizes(33, 8, True)[3], _feature_sizes(41, 8, True)[3]

    ctt = build_model("deeplabv2", C, rep_head="ctt").eval()
    out = ctt(x)
    assert set(out) == {"logits", "rep"} and ctt.logits_stride == 8
    assert out["logits"].shape == (B, C, h, w) and out["rep"].shape == (B, 256, h, w)
    assert torch.allclose(out["rep"].norm(dim=1), torch.ones(B, h, w), atol=1e-5)
    head = ctt.layer5
    assert len(head.branches) == 5 and [b[0].dilation[0] for b in head.branches] == [1, 6, 12, 18, 24]
    assert head.se.fc[0].in_features == 1280 and head.se.fc[0].out_features == 80
    assert head.bottleneck[0].in_channels == 1280 and head.bottleneck[1].num_groups == 32
    assert head.classifier.bias is None and ctt.layer6 is None

    mllc = build_model("deeplabv2", C, rep_head="mllc").eval()
    out = mllc(x)
    assert out["rep"].shape == (B, 256, h, w)
    assert not torch.allclose(out["rep"].norm(dim=1), torch.ones(B, h, w), atol=1e-3)
    assert torch.allclose(out["rep"], mllc.layer6(mllc.backbone(mllc.normalize(x))[3])[1], atol=1e-5)

    plain = build_model("deeplabv2", C, rep_head=False)
    assert set(plain(x)) == {"logits"} and plain.layer6 is None
    assert isinstance(plain, DeepLabV2) and not plain.backbone.deep_stem


# ------------------------------------------------------------------- official crop -> logit sizes
@pytest.mark.parametrize("arch, deep_stem, size, expected", [
    ("deeplabv2", False, (321, 321), (41, 41)),           # CTT/MLLC VOC
    ("deeplabv2", False, (256, 512), (33, 65)),           # CTT/MLLC City (needs ceil-mode max-pool)
    ("deeplabv3plus_u2pl", True, (513, 513), (129, 129)),  # U2PL VOC
    ("deeplabv3plus_u2pl", True, (769, 769), (193, 193)),  # U2PL City
    ("deeplabv3plus", True, (321, 321), (81, 81)),         # UniMatch VOC
])
def test_official_logit_sizes_resnet101(arch, deep_stem, size, expected):
    with torch.device("meta"):
        model = build_model(arch, 21, "resnet101", deep_stem=deep_stem, rep_head=True).eval()
        out = model(torch.empty(1, 3, *size))
    assert out["logits"].shape == (1, 21, *expected) and out["rep"].shape[-2:] == expected


# ---------------------------------------------------------------------------------------- weights
def test_weights_round_trip_torchvision_layout(tmp_path):
    src = ResNet(18)
    state = _random_state(src)
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["module.fc.weight"] = torch.randn(1000, 512)
    wrapped["module.fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": wrapped, "epoch": 3}, path)

    dst = ResNet(18)
    assert not torch.equal(dst.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    report = load_backbone_weights(dst, path)
    assert sorted(report["loaded"]) == sorted(state) and not report["missing"]
    assert not report["unexpected"] and not report["mismatched"]
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_weights_prefixes_and_optional_num_batches_tracked(tmp_path):
    state = {k: v for k, v in _random_state(ResNet(18)).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "r.pt"
    torch.save({"model": {f"module.backbone.{k}": v for k, v in state.items()}}, path)
    dst = ResNet(18)
    report = load_backbone_weights(dst, str(path), strict=True)
    assert not report["missing"] and len(report["loaded"]) == len(state)
    assert torch.equal(dst.bn1.running_var, state["bn1.running_var"])


def test_weights_missing_file(tmp_path):
    path = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="resnet50.pth"):
        load_backbone_weights(ResNet(18), path)


def test_weights_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save({"weights": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match="state dict"):
        load_backbone_weights(ResNet(18), path)


def test_weights_strict_errors_and_partial_load(tmp_path):
    state = _random_state(ResNet(18))
    state["layer1.0.conv1.weight"] = torch.randn(64, 64, 1, 1)
    del state["layer4.1.bn2.weight"]
    state["layer9.weight"] = torch.randn(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)

    dst = ResNet(18)
    before = dst.layer1[0].conv1.weight.clone()
    with pytest.raises(ValueError) as err:
        load_backbone_weights(dst, path)
    msg = str(err.value)
    assert "layer1.0.conv1.weight" in msg and "(64, 64, 1, 1)" in msg
    assert "layer4.1.bn2.weight" in msg and "layer9.weight" in msg
    assert torch.equal(dst.layer1[0].conv1.weight, before)  # strict failure copies nothing

    report = load_backbone_weights(dst, path, strict=False)
    assert report["mismatched"] == ["layer1.0.conv1.weight"]
    assert report["missing"] == ["layer4.1.bn2.weight"] and report["unexpected"] == ["layer9.weight"]
    assert torch.equal(dst.layer1[0].conv1.weight, before)
    assert torch.equal(dst.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


def test_weights_deep_stem_needs_deep_stem_file(tmp_path):
    state = _random_state(ResNet(18))
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    deep = ResNet(18, deep_stem=True)
    with pytest.raises(ValueError, match="not torchvision layout"):
        load_backbone_weights(deep, path)
    report = load_backbone_weights(deep, path, strict=False)
    assert "conv1.0.weight" in report["missing"] and "conv1.weight" in report["unexpected"]
    assert "bn1.weight" in report["mismatched"]
    assert torch.equal(deep.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])

    deep_path = tmp_path / "deep.pth"
    torch.save(ResNet(18, deep_stem=True).state_dict(), deep_path)
    with pytest.raises(ValueError, match="deep_stem=True"):
        load_backbone_weights(ResNet(18), deep_path)


def test_build_model_pretrained(tmp_path):
    state = _random_state(ResNet(18))
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build_model("deeplabv2", C, pretrained=path)
    assert len(model.pretrained_report["loaded"]) == len(state)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match="not torchvision layout"):
        build_model("deeplabv3plus", C, deep_stem=True, pretrained=path)
    model = build_model("deeplabv3plus", C, deep_stem=True, pretrained=path, pretrained_strict=False)
    assert "conv1.0.weight" in model.pretrained_report["missing"]


# ---------------------------------------------------------------------------------------- builder
def test_builder_names_and_presets():
    assert MODELS == ("deeplabv3plus", "deeplabv3plus_u2pl", "deeplabv2")
    assert BACKBONES == ("resnet18", "resnet50", "resnet101")
    uni = build_model("deeplabv3plus", C)
    u2pl = build_model("deeplabv3plus_u2pl", C)
    v2 = build_model("deeplabv2", C)
    assert (uni.backbone.output_stride, u2pl.backbone.output_stride, v2.backbone.output_stride) == (16, 8, 8)
    assert u2pl.backbone.multi_grid == (2, 2, 4) and uni.backbone.multi_grid is None
    assert (uni.backbone.maxpool.ceil_mode, u2pl.backbone.maxpool.ceil_mode, v2.backbone.maxpool.ceil_mode) == (
        False, True, True)
    assert build_model("deeplabv3plus_u2pl", C, multi_grid=(1, 1, 1)).backbone.multi_grid == (1, 1, 1)
    with torch.device("meta"):
        assert build_model("deeplabv3plus", C, "resnet50").backbone.channels[3] == 2048


@pytest.mark.parametrize("kwargs, match", [
    ({"arch": "pspnet"}, "arch"),
    ({"backbone": "resnet34"}, "backbone"),
    ({"output_stride": 4}, "output_stride"),
    ({"arch": "deeplabv2", "rep_head": "byol"}, "rep_head"),
    ({"rep_head": "ctt"}, "rep_head"),
    ({"num_classes": 0}, "num_classes"),
    ({"fp_dropout": 1.0}, "fp_dropout"),
    ({"aspp_dilations": (6, 0, 18)}, "aspp_dilations"),
    ({"arch": "deeplabv2", "aux_head": True}, "aux_head"),
])
def test_builder_errors_name_the_argument(kwargs, match):
    args = {"arch": "deeplabv3plus", "num_classes": C, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_logits_feed_an_upsampled_loss():
    """The caller up-samples; gradients flow through the whole model."""
    model = build_model("deeplabv3plus_u2pl", C, rep_head=True)
    x = torch.rand(B, 3, 33, 33)
    out = model(x)
    up = F.interpolate(out["logits"], size=x.shape[-2:], mode="bilinear", align_corners=True)
    loss = F.cross_entropy(up, torch.randint(0, C, (B, 33, 33))) + out["rep"].square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
