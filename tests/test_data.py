"""The synthetic data set and the labeled/unlabeled splits."""
import os

import pytest
import torch

from semiseg_fast.data import DATASETS, SegData, build_dataset, synthetic
from semiseg_fast.data.augment import rgb_to_hsv
from semiseg_fast.data.splits import labeled_count, labeled_split, parse_labeled
from semiseg_fast.data.synthetic import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    NUM_CLASSES,
    generate_scenes,
    load_synthetic,
)

# -- synthetic scenes ---------------------------------------------------------------------------

def test_class_table_needs_all_three_cues():
    assert NUM_CLASSES == len(CLASS_NAMES) == 8 and CLASS_NAMES[0] == "background"
    rows = [row[1:] for row in synthetic.CLASS_TABLE]
    assert len(set(rows)) == len(rows)
    assert not set(synthetic._DISTRACTOR_COMBOS) & set(rows)
    others = set(synthetic._DISTRACTOR_COMBOS) | set(rows)
    for row in rows:
        # any two cues of a class also occur with a different third cue (in clutter or another class)
        for keep in ((0, 1), (0, 2), (1, 2)):
            twins = [o for o in others if o != row and all(o[k] == row[k] for k in keep)]
            assert twins, (row, keep)
    for colour in synthetic.COLOURS:
        assert sum(row[2] == colour for row in rows) >= 2  # colour alone never names a class


def test_same_seed_same_scenes_and_batch_independence():
    images, labels = generate_scenes(5, range(6), 32)
    again_images, again_labels = generate_scenes(5, range(6), 32)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (6, 32, 32) and labels.dtype == torch.uint8
    for i in (0, 3, 5):
        one_image, one_label = generate_scenes(5, [i], 32)
        assert torch.equal(one_image[0], images[i]) and torch.equal(one_label[0], labels[i])
    shuffled_images, shuffled_labels = generate_scenes(5, [4, 1, 2], 32)
    assert torch.equal(shuffled_images, images[[4, 1, 2]]) and torch.equal(shuffled_labels, labels[[4, 1, 2]])


def test_scenes_do_not_depend_on_chunking():
    # 48x48 renders 37 images per chunk: index 37 starts a second chunk in the batched call
    images, labels = generate_scenes(8, range(40), 48)
    for i in (0, 36, 37, 39):
        one_image, one_label = generate_scenes(8, [i], 48)
        assert torch.equal(one_image[0], images[i]) and torch.equal(one_label[0], labels[i])
    reversed_images, _ = generate_scenes(8, range(39, -1, -1), 48)
    assert torch.equal(reversed_images.flip(0), images)


def test_different_seeds_and_indices_differ():
    a, la = generate_scenes(0, range(4), 32)
    b, lb = generate_scenes(1, range(4), 32)
    assert not torch.equal(a, b) and not torch.equal(la, lb)
    for i in range(1, 4):
        assert not torch.equal(a[0], a[i])


def test_non_square_size():
    images, labels = generate_scenes(0, range(2), (24, 40))
    assert images.shape == (2, 3, 24, 40) and labels.shape == (2, 24, 40)


def test_scene_is_resolution_independent():
    _, small = generate_scenes(2, range(6), 48)
    _, large = generate_scenes(2, range(6), 96)
    # pixel centres differ by a quarter of a small pixel: only object boundaries may disagree
    agree = (large[:, ::2, ::2] == small).float().mean().item()
    assert agree > 0.93
    for c in torch.unique(small).tolist():
        share_small = (small == c).float().mean().item()
        share_large = (large == c).float().mean().item()
        assert abs(share_small - share_large) < 0.01


def test_labels_cover_every_class_without_degenerate_frequencies():
    _, labels = generate_scenes(11, range(48), 48)
    assert int(labels.max()) < NUM_CLASSES
    freq = torch.bincount(labels.flatten().long(), minlength=NUM_CLASSES).double() / labels.numel()
    assert freq.numel() == NUM_CLASSES
    assert 0.6 < freq[0] < 0.9, freq
    assert (freq[1:] > 0.005).all(), freq
    assert freq[1:].max() < 4 * freq[1:].min(), freq
    present_per_image = [len(torch.unique(lab)) - 1 for lab in labels]
    assert min(present_per_image) >= 1 and sum(present_per_image) / len(labels) > 2


def test_images_are_not_solvable_from_one_pixel_colour():
    # the same colour family is used by several classes and by background clutter, so pixels of
    # one class must overlap in colour with pixels of another and with background
    images, labels = generate_scenes(3, range(32), 48)
    hsv = rgb_to_hsv(images.float() / 255)
    warm = ((hsv[:, 0] < 0.09) | (hsv[:, 0] > 0.96)) & (hsv[:, 1] > 0.5) & (hsv[:, 2] > 0.35)
    classes_in_warm = torch.bincount(labels[warm].long(), minlength=NUM_CLASSES)
    assert (classes_in_warm[[1, 2, 3]] > 0).all()
    assert classes_in_warm[0] > 0.05 * classes_in_warm[1:].sum()  # warm clutter in the background


def test_train_and_val_are_different_scenes():
    train = load_synthetic("train", 4, 32, seed=0)
    val = load_synthetic("val", 4, 32, seed=0)
    assert train.images.shape == val.images.shape == (4, 3, 32, 32)
    for i in range(4):
        for j in range(4):
            assert not torch.equal(train.images[i], val.images[j])
    assert train.num_classes == NUM_CLASSES and train.class_names == CLASS_NAMES and train.ignore_index == 255
    assert len(train) == 4


def test_load_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_synthetic("test", 4, 32)
    with pytest.raises(ValueError, match="num_images"):
        load_synthetic("train", 0, 32)
    with pytest.raises(ValueError, match="size"):
        load_synthetic("train", 2, 0)


def test_cache_round_trip(tmp_path, monkeypatch):
    first = load_synthetic("train", 3, 24, seed=7, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert files == [synthetic.cache_file_name("train", 3, 24, 7)]
    assert f"v{GENERATOR_VERSION}" in files[0] and "train" in files[0] and "24x24" in files[0]

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached file should have been read")

    monkeypatch.setattr(synthetic, "generate_scenes", no_generation)
    second = load_synthetic("train", 3, 24, seed=7, cache_dir=str(tmp_path))
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert os.listdir(tmp_path) == files  # atomic write: no temporary file left behind


def test_damaged_cache_is_regenerated(tmp_path):
    path = tmp_path / synthetic.cache_file_name("val", 2, 16, 0)
    path.write_bytes(b"not a torch file")
    data = load_synthetic("val", 2, 16, cache_dir=str(tmp_path))
    expected, _ = generate_scenes(0, range(synthetic.SPLIT_OFFSETS["val"], synthetic.SPLIT_OFFSETS["val"] + 2), 16)
    assert torch.equal(data.images, expected)
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert torch.equal(load_synthetic("val", 2, 16, cache_dir=str(tmp_path)).images, expected)


def test_build_dataset_from_config(tmp_path):
    class Cfg:
        data = "synthetic"
        num_train, num_val, image_size, data_seed = 5, 3, 20, 1
        cache_dir = ""
        root = None
        progress = False

    assert "synthetic" in DATASETS
    data = build_dataset(Cfg)
    assert isinstance(data, SegData)
    assert data.train_images.shape == (5, 3, 20, 20) and data.val_labels.shape == (3, 20, 20)
    assert data.num_classes == NUM_CLASSES and list(data.class_names) == list(CLASS_NAMES)
    assert os.listdir(tmp_path) == []


# -- splits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("labeled, expected", [(1 / 16, 63), (0.25, 250), (1.0, 1000), (92, 92), (1, 1), (1000, 1000),
                                               (1e-6, 1)])
def test_split_sizes(labeled, expected):
    lab, unlab = labeled_split(1000, labeled, seed=0)
    assert lab.numel() == expected == labeled_count(1000, labeled)
    assert unlab.numel() == 1000 - expected
    assert lab.dtype == unlab.dtype == torch.int64
    assert torch.equal(torch.cat([lab, unlab]).sort().values, torch.arange(1000))
    assert torch.equal(lab, lab.sort().values) and torch.equal(unlab, unlab.sort().values)


def test_split_is_deterministic_nested_and_seed_dependent():
    a, _ = labeled_split(500, 1 / 8, seed=3)
    b, _ = labeled_split(500, 1 / 8, seed=3)
    c, _ = labeled_split(500, 1 / 8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    small, _ = labeled_split(500, 1 / 16, seed=3)
    assert set(small.tolist()) <= set(a.tolist())


@pytest.mark.parametrize("bad", [0, -1, 0.0, -0.5, 1.5, 101, True, False, float("nan"), "1/2", None])
def test_split_rejects_bad_labeled(bad):
    with pytest.raises(ValueError, match="labeled"):
        labeled_split(100, bad, seed=0)


def test_split_rejects_bad_size():
    with pytest.raises(ValueError, match="num_images"):
        labeled_split(0, 0.5, seed=0)


@pytest.mark.parametrize("text, expected", [("1/16", 0.0625), ("0.25", 0.25), ("92", 92), (" 1/8 ", 0.125),
                                            ("1.0", 1.0), ("1", 1), ("1e-1", 0.1)])
def test_parse_labeled(text, expected):
    value = parse_labeled(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("junk", ["", "abc", "1/0", "0", "-3", "1.5", "3/2", "nan", "1/2/3", "0/4", "1/x"])
def test_parse_labeled_rejects_junk(junk):
    with pytest.raises(ValueError, match="labeled"):
        parse_labeled(junk)
