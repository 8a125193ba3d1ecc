"""Offline backbone pretraining (``python -m semiseg_fast.pretrain``): samples, the written file, loading it."""
import json

import pytest
import torch

from semiseg_fast.cli import main as train_main
from semiseg_fast.data.fashion import load_garments, render_garment_crops
from semiseg_fast.models import build_model
from semiseg_fast.pretrain import MARGIN, PretrainConfig, crops, main, object_boxes, pretrain
from tests.test_fashion import write_root


def tiny(tmp_path, data="synthetic", **kw) -> PretrainConfig:
    base = dict(data=data, scenes=24, held_out=6, image_size=40, crop=24, epochs=1, batch_size=8, progress=False,
                out=str(tmp_path / "w.pt"))
    return PretrainConfig(**(base | kw))


def test_object_boxes_match_a_loop():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (3, 9, 11), generator=g, dtype=torch.uint8)
    labels[1] = 0
    labels[1, 2:5, 3:8] = 2  # one class, an exact box
    rows = {tuple(r) for r in object_boxes(labels, 4, min_pixels=1).tolist()}
    want = set()
    for n in range(3):
        for c in range(1, 4):
            ys, xs = (labels[n] == c).nonzero(as_tuple=True)
            if len(ys):
                want.add((n, c, int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())))
    assert rows == want
    assert (1, 2, 2, 3, 4, 7) in rows
    assert len(object_boxes(labels, 4, min_pixels=100)) == 0  # no class has 100 pixels


def test_centred_crop_of_a_box_is_the_box():
    image = torch.randint(0, 256, (1, 3, 20, 20), dtype=torch.uint8)
    # a 16-pixel box that MARGIN enlarges to exactly the 20-pixel image
    side = round(20 / MARGIN)
    lo = (20 - side) // 2
    box = torch.tensor([[0, 1, lo, lo, lo + side - 1, lo + side - 1]])
    out = crops(image, box, 20)
    torch.testing.assert_close(out[0], image[0].float() / 255, atol=1e-5, rtol=0)
    flipped = crops(image, box, 20, torch.Generator().manual_seed(1))
    assert flipped.shape == (1, 3, 20, 20) and 0 <= float(flipped.min()) and float(flipped.max()) <= 1


def test_garment_crops_are_the_same_alone_or_in_a_batch(tmp_path):
    garments = load_garments("train", write_root(tmp_path / "fm"))
    images, labels = render_garment_crops(garments, 3, range(10, 16), 32)
    alone, label = render_garment_crops(garments, 3, [13], 32)
    assert torch.equal(images[3], alone[0]) and int(labels[3]) == int(label[0])
    assert images.dtype == torch.uint8 and labels.min() >= 0 and labels.max() <= 9


@pytest.mark.parametrize("data", ["synthetic", "fashion"])
def test_pretrain_writes_weights_that_every_model_loads_with_every_key(tmp_path, data):
    extra = {"root": str(write_root(tmp_path / "fm"))} if data == "fashion" else {}
    meta = pretrain(tiny(tmp_path, data, **extra), echo=lambda *a, **k: None)
    assert 0.0 <= meta["held_out_accuracy"] <= 1.0 and len(meta["history"]) == 1
    assert json.loads((tmp_path / "w.json").read_text())["held_out_accuracy"] == meta["held_out_accuracy"]
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    assert "fc.weight" in saved["state_dict"]
    for arch in ("deeplabv3plus", "deeplabv3plus_u2pl", "deeplabv2"):
        model = build_model(arch, 5, pretrained=tmp_path / "w.pt")
        report = model.pretrained_report
        expected = set(model.backbone.state_dict())
        assert set(report["loaded"]) == expected, arch  # every backbone key, batch-norm counters included
        assert report["missing"] == report["unexpected"] == report["mismatched"] == []
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, saved["state_dict"][k]), k


def test_train_py_takes_the_pretrained_file(tmp_path):
    pretrain(tiny(tmp_path), echo=lambda *a, **k: None)
    code = train_main(["--method", "supervised", "--pretrained", str(tmp_path / "w.pt"), "--iters", "1",
                       "--num-train", "16", "--num-val", "4", "--image-size", "32", "--crop", "32",
                       "--batch-size", "2", "--cache-dir", "", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["--data", "voc", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["--data", "synthetic", "--epochs", "0", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--epochs" in capsys.readouterr().err
    (tmp_path / "x.pt").write_bytes(b"old")
    assert main(["--data", "synthetic", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "x.pt").read_bytes() == b"old"


def test_garment_side_sets_the_garments_size(tmp_path, capsys):
    garments = load_garments("train", write_root(tmp_path / "fm"))
    small = render_garment_crops(garments, 0, range(8), 40, side=(0.3, 0.3))[0]
    large = render_garment_crops(garments, 0, range(8), 40, side=(0.9, 0.9))[0]
    assert not torch.equal(small, large)
    seen = []
    import semiseg_fast.data.fashion as fashion_module
    real = fashion_module.render_garment_crops
    fashion_module.render_garment_crops = lambda *a, **k: seen.append(k["side"]) or real(*a, **k)
    try:
        pretrain(tiny(tmp_path, "fashion", root=str(tmp_path / "fm"), garment_side=(0.3, 0.6)), echo=lambda *a, **k: None)
    finally:
        fashion_module.render_garment_crops = real
    assert seen == [(0.3, 0.6), (0.3, 0.6)]  # training and held-out samples alike
    for bad in (["0", "0.5"], ["0.6", "0.3"], ["0.5", "1.5"]):
        assert main(["--garment-side", *bad, "--out", str(tmp_path / "y.pt")]) == 2
        assert "--garment-side" in capsys.readouterr().err
