"""``profiling.backbone_probe``: the three ways it scores a pretrained classifier on scenes."""
import torch

from profiling.backbone_probe import main, probe
from semiseg_fast.pretrain import Classifier


def scenes():
    labels = torch.zeros(5, 24, 24, dtype=torch.long)
    labels[0, 2:10, 3:12] = 1
    labels[0, 12:20, 12:22] = 3
    labels[1, 4:16, 4:16] = 2
    labels[2, 0:6, 0:24] = 3  # touching the border
    labels[3, 5:7, 5:7] = 1  # 4 pixels
    labels[4, 1:23, 1:23] = 2
    labels[4, 8:12, 8:12] = 3  # inside the other object
    images = torch.randint(0, 256, (5, 3, 24, 24), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return images, labels


def state(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return Classifier("resnet18", num_classes).torchvision_state_dict()


def test_a_classifier_that_always_says_one_class_scores_that_class_share():
    images, labels = scenes()
    objects = [(0, 1), (0, 3), (1, 2), (2, 3), (3, 1), (4, 2), (4, 3)]
    for k in (1, 2, 3):
        s = state()
        s["fc.weight"].zero_()
        s["fc.bias"].zero_()
        s["fc.bias"][k - 1] = 1.0
        r = probe(s, images, labels, strides=(32, 8), crop=16, batch=2)
        pixels = labels[labels > 0]
        assert r["objects"] == len(objects)
        assert r["dense_os32"] == r["dense_os8"] == int((pixels == k).sum()) / len(pixels)
        share = sum(c == k for _, c in objects) / len(objects)
        assert r["mask_os32"] == r["mask_os8"] == r["box"] == share


def test_the_batch_size_changes_nothing():
    images, labels = scenes()
    s = state(seed=1)
    s["fc.weight"].mul_(50)  # a random classifier that disagrees across objects
    one = probe(s, images, labels, strides=(16,), crop=16, batch=5)
    assert probe(s, images, labels, strides=(16,), crop=16, batch=2) == one
    assert 0 <= min(one.values()) and max(v for k, v in one.items() if k != "objects") <= 1


def test_bad_weights_are_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "w.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, bad)
    assert main(["--weights", str(bad), "--data", "synthetic"]) == 2
    assert "--weights" in capsys.readouterr().err
