"""The Fashion-MNIST scenes (``--data fashion``), on tiny fake IDX files (one test uses the real package)."""
import gzip
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg_fast.cli import main
from semiseg_fast.config import TrainConfig
from semiseg_fast.data import DATASETS, SegData, build_dataset, fashion
from semiseg_fast.data.fashion import (
    CLASS_NAMES,
    DEFAULT_ROOT,
    NUM_CLASSES,
    generate_fashion_scenes,
    load_fashion,
    load_garments,
    locate_fashion_files,
    scene_layout,
)
from semiseg_fast.errors import DataError

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
VAL_IMAGES, VAL_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
THRESHOLD = 25  # documented: a garment owns the pixels where its rescaled grey value is > 25


# -- fake IDX files -----------------------------------------------------------------------------

def write_idx(path, array, magic=None, dims=None, cut=0):
    """A gzip IDX file; ``magic``/``dims`` override the header, ``cut`` drops bytes off the data."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (0x0800 | arr.ndim) if magic is None else magic
    dims = arr.shape if dims is None else dims
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in dims) + arr.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[:len(raw) - cut])


def shapes() -> np.ndarray:
    """12 simple garments: boxes, a disc, a ring, a cross, a triangle, ramps (values cross the threshold)."""
    yy, xx = np.mgrid[0:28, 0:28]
    r2 = (yy - 13.5) ** 2 + (xx - 13.5) ** 2
    g = np.zeros((12, 28, 28), np.uint8)
    g[0, 4:24, 6:22] = 255
    g[1, 2:26, 10:18] = 255
    g[2][r2 <= 100] = 200
    g[3][(r2 <= 144) & (r2 >= 49)] = 255
    g[4, 11:17, 3:25] = 255
    g[4, 3:25, 11:17] = 255
    g[5][(yy >= 4) & (np.abs(xx - 13.5) <= (yy - 4) * 0.6)] = 180
    g[6] = (xx * 9).astype(np.uint8)  # horizontal ramp 0..243
    g[7] = (yy * 9).astype(np.uint8)[::-1]
    g[8, 8:20, 8:20] = 40  # faint, just above the threshold
    g[8, 12:16, 12:16] = 255
    g[9, 5:23, 5:23] = 20  # below the threshold except its core
    g[9, 10:18, 10:18] = 220
    g[10, :, :] = 255  # the whole box
    g[11, 0:14, 0:14] = 255
    return g


def write_root(folder: Path, train=None, val=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train = shapes() if train is None else train
    val = shapes()[[2, 5, 8, 0, 4]] if val is None else val
    write_idx(folder / TRAIN_IMAGES, train)
    write_idx(folder / TRAIN_LABELS, np.arange(len(train)) % 10)
    write_idx(folder / VAL_IMAGES, val)
    write_idx(folder / VAL_LABELS, np.full(len(val), 5))  # every val garment is a sandal (class id 6)
    return folder


@pytest.fixture
def root(tmp_path) -> Path:
    return write_root(tmp_path / "fmnist")


# -- the expected labels, computed independently of the code under test --------------------------

def expected_labels(garments: np.ndarray, classes: np.ndarray, layout, height: int, width: int):
    """Painter's algorithm over the layout with torch's own bilinear resize; also the pixels too
    close to the threshold to be decided by a different float rounding (left out of comparisons)."""
    labels = np.zeros((height, width), np.int64)
    unsure = np.zeros((height, width), bool)
    for p in layout:
        g = torch.from_numpy(garments[p.garment].astype(np.float64))[None, None]
        g = F.interpolate(g, size=(p.side, p.side), mode="bilinear", align_corners=False)[0, 0].numpy()
        box = np.s_[p.top:p.top + p.side, p.left:p.left + p.side]
        labels[box] = np.where(g > THRESHOLD, classes[p.garment] + 1, labels[box])
        unsure[box] |= np.abs(g - THRESHOLD) < 1e-6
    return labels, unsure


def test_class_list():
    assert NUM_CLASSES == 11 == len(CLASS_NAMES)
    assert CLASS_NAMES == ("background", "t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                           "sneaker", "bag", "ankle_boot")
    assert "fashion" in DATASETS and "synthetic" in DATASETS


def test_same_seed_same_scenes_different_seed_different(root):
    garments = load_garments("train", root)
    a = generate_fashion_scenes(garments, 3, range(5), 32)
    b = generate_fashion_scenes(garments, 3, range(5), 32)
    c = generate_fashion_scenes(garments, 4, range(5), 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert not torch.equal(a[0][0], a[0][1])  # scenes of one stream differ too


def test_scene_is_the_same_alone_or_in_a_batch(root):
    garments = load_garments("train", root)
    images, labels = generate_fashion_scenes(garments, 1, range(6), (30, 34))
    for i in (0, 4):
        alone_images, alone_labels = generate_fashion_scenes(garments, 1, [i], (30, 34))
        assert torch.equal(alone_images[0], images[i]) and torch.equal(alone_labels[0], labels[i])
    rev_images, rev_labels = generate_fashion_scenes(garments, 1, range(5, -1, -1), (30, 34))
    assert torch.equal(rev_images.flip(0), images) and torch.equal(rev_labels.flip(0), labels)


def test_shapes_dtypes_and_label_range(root):
    data = load_fashion("train", 7, (24, 36), seed=2, root=root)
    assert data.images.shape == (7, 3, 24, 36) and data.images.dtype == torch.uint8
    assert data.labels.shape == (7, 24, 36) and data.labels.dtype == torch.uint8
    assert int(data.labels.max()) < NUM_CLASSES and data.num_classes == NUM_CLASSES
    assert bool((data.labels.flatten(1).max(1).values > 0).all())  # every scene shows a garment
    assert bool((data.labels == 0).any())
    assert data.class_names == CLASS_NAMES and len(data) == 7 and data.cache_path is None
    for i in range(7):
        layout = scene_layout(2, i, 12, (24, 36))
        assert 2 <= len(layout) <= 4
        for p in layout:  # side 0.3-0.6 of the image side, fully inside the image
            assert round(0.3 * 24) <= p.side <= round(0.6 * 24)
            assert 0 <= p.top <= 24 - p.side and 0 <= p.left <= 36 - p.side
            assert all(0.0 <= c <= 1.0 for c in p.tint)


def test_one_known_garment_labels_its_thresholded_pixels(tmp_path):
    # pool: garment 3 is a known ring (class "dress"), all others are blank and own no pixel
    pool = np.zeros((12, 28, 28), np.uint8)
    pool[3] = shapes()[3]
    blank = np.zeros_like(pool)
    size = 48
    data = load_garments("train", write_root(tmp_path / "one", train=pool))
    empty = load_garments("train", write_root(tmp_path / "none", train=blank))
    found = 0
    for index in range(40):
        layout = scene_layout(0, index, 12, size)
        if [p.garment for p in layout].count(3) != 1:
            continue
        (p,) = [p for p in layout if p.garment == 3]
        images, labels = generate_fashion_scenes(data, 0, [index], size)
        g = F.interpolate(torch.from_numpy(pool[3].astype(np.float64))[None, None], size=(p.side, p.side),
                          mode="bilinear", align_corners=False)[0, 0]
        expected = torch.zeros(size, size, dtype=torch.uint8)
        expected[p.top:p.top + p.side, p.left:p.left + p.side] = (g > THRESHOLD).to(torch.uint8) * 4  # dress = 4
        unsure = torch.zeros(size, size, dtype=torch.bool)
        unsure[p.top:p.top + p.side, p.left:p.left + p.side] = (g - THRESHOLD).abs() < 1e-6
        assert int((expected > 0).sum()) > 50
        assert torch.equal(labels[0][~unsure], expected[~unsure])
        # the image: blank garments leave it untouched, and so does the ring outside its own pixels
        blank_images, blank_labels = generate_fashion_scenes(empty, 0, [index], size)
        assert int(blank_labels.max()) == 0
        untouched = expected == 0
        assert torch.equal(images[0][:, untouched], blank_images[0][:, untouched])
        differs = (images[0].int() - blank_images[0].int()).abs().amax(0) > 0
        assert differs[expected > 0].float().mean() > 0.8
        found += 1
    assert found >= 2


def test_labels_are_the_painted_thresholded_garments(root):
    garments = shapes()
    classes = np.arange(12) % 10
    pool = load_garments("train", root)
    height, width = 40, 44
    images, labels = generate_fashion_scenes(pool, 7, range(8), (height, width))
    for i in range(8):
        expected, unsure = expected_labels(garments, classes, scene_layout(7, i, 12, (height, width)), height, width)
        got = labels[i].numpy().astype(np.int64)
        assert unsure.mean() < 0.05
        assert np.array_equal(got[~unsure], expected[~unsure]), i


def test_train_and_val_scenes_use_their_own_files(root):
    train = load_fashion("train", 6, 32, root=root)
    val = load_fashion("val", 6, 32, root=root)
    assert set(val.labels.unique().tolist()) <= {0, 6} and 6 in val.labels.unique().tolist()
    assert len(set(train.labels.unique().tolist()) - {0, 6}) >= 3
    assert load_garments("val", root).source == (str(root / VAL_IMAGES), str(root / VAL_LABELS))
    assert len(load_garments("val", root)) == 5 and len(load_garments("train", root)) == 12
    # val scenes pick from the 5 t10k garments: painting them reproduces the val labels
    val_pool = shapes()[[2, 5, 8, 0, 4]]
    offset = fashion.SPLIT_OFFSETS["val"]
    for i in range(6):
        expected, unsure = expected_labels(val_pool, np.full(5, 5), scene_layout(0, offset + i, 5, 32), 32, 32)
        assert np.array_equal(val.labels[i].numpy()[~unsure], expected[~unsure])


def _corrupt(folder: Path, how: str) -> str:
    g = shapes()
    if how == "images magic":
        write_idx(folder / TRAIN_IMAGES, g, magic=0x00000801)
        return TRAIN_IMAGES
    if how == "labels magic":
        write_idx(folder / VAL_LABELS, np.zeros(5), magic=0x00000803)
        return VAL_LABELS
    if how == "truncated data":
        write_idx(folder / TRAIN_IMAGES, g, cut=100)
        return TRAIN_IMAGES
    if how == "truncated header":
        with gzip.open(folder / TRAIN_LABELS, "wb") as f:
            f.write(b"\x00\x00\x08\x01\x00")
        return TRAIN_LABELS
    if how == "cut gzip stream":
        raw = (folder / VAL_IMAGES).read_bytes()
        (folder / VAL_IMAGES).write_bytes(raw[:len(raw) // 2])
        return VAL_IMAGES
    if how == "not gzip":
        (folder / TRAIN_IMAGES).write_bytes(b"this is not a gzip file at all")
        return TRAIN_IMAGES
    if how == "wrong dimensions":
        write_idx(folder / TRAIN_IMAGES, g[:, :27, :])
        return TRAIN_IMAGES
    if how == "count mismatch":
        write_idx(folder / TRAIN_LABELS, np.zeros(11))
        return TRAIN_LABELS
    if how == "label out of range":
        write_idx(folder / TRAIN_LABELS, np.full(12, 10))
        return TRAIN_LABELS
    if how == "missing file":
        os.unlink(folder / VAL_LABELS)
        return VAL_LABELS
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["images magic", "labels magic", "truncated data", "truncated header",
                                 "cut gzip stream", "not gzip", "wrong dimensions", "count mismatch",
                                 "label out of range", "missing file"])
def test_bad_files_are_a_data_error_naming_the_file(root, how):
    name = _corrupt(root, how)
    split = "train" if name.startswith("train") else "val"
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_fashion(split, 2, 32, root=root)


def test_missing_default_files_give_the_command_and_install_nothing(tmp_path, monkeypatch):
    target = tmp_path / "usr-share"
    monkeypatch.setattr(fashion, "DEFAULT_ROOT", str(target))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: ran.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **kw: ran.append(a))
    # not root: the exact command, with sudo
    monkeypatch.setattr(fashion.os, "geteuid", lambda: 1000, raising=False)
    with pytest.raises(DataError, match="`sudo apt-get install dataset-fashion-mnist` or pass --root"):
        locate_fashion_files()
    # root: the command without sudo, and still nothing runs
    monkeypatch.setattr(fashion.os, "geteuid", lambda: 0, raising=False)
    with pytest.raises(DataError, match="`apt-get install dataset-fashion-mnist` or pass --root"):
        load_fashion("val", 2, 32)
    assert ran == []
    # once the files are there they are used
    write_root(target)
    assert load_fashion("val", 2, 32).images.shape == (2, 3, 32, 32)
    # a --root must hold every file: the missing one is named
    with pytest.raises(DataError, match=TRAIN_IMAGES.replace(".", r"\.")):
        locate_fashion_files(tmp_path)


def test_cache_round_trip(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_fashion("train", 4, 32, seed=1, root=root, cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith(f"fashion-v{fashion.GENERATOR_VERSION}-train-n4-32x32-seed1-src")
    assert first.cache_path == str(cache / files[0])

    def no_generation(*a, **kw):
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as m:
        m.setattr(fashion, "generate_fashion_scenes", no_generation)
        again = load_fashion("train", 4, 32, seed=1, root=root, cache_dir=str(cache))
        assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
        # other garment files are another cache entry
        other = write_root(tmp_path / "other", train=shapes()[::-1].copy())
        with pytest.raises(AssertionError, match="cache was not used"):
            load_fashion("train", 4, 32, seed=1, root=other, cache_dir=str(cache))
    # a damaged cache is regenerated, atomically, without temporary files left behind
    (cache / files[0]).write_bytes(b"garbage")
    regenerated = load_fashion("train", 4, 32, seed=1, root=root, cache_dir=str(cache))
    assert torch.equal(regenerated.images, first.images)
    assert os.listdir(cache) == files


def test_build_dataset_through_train_config(root, tmp_path):
    cfg = TrainConfig(data="fashion", root=str(root), num_train=6, num_val=3, image_size=32, data_seed=1,
                      cache_dir=None, progress=False, out=str(tmp_path / "run")).validate()
    data = build_dataset(cfg)
    assert isinstance(data, SegData)
    assert data.train_images.shape == (6, 3, 32, 32) and data.val_labels.shape == (3, 32, 32)
    assert data.num_classes == 11 and data.class_names == CLASS_NAMES
    expected = load_fashion("val", 3, 32, seed=1, root=root)
    assert torch.equal(data.val_images, expected.images)
    os.unlink(root / TRAIN_LABELS)
    with pytest.raises(DataError, match=TRAIN_LABELS.replace(".", r"\.")):
        build_dataset(cfg)


def test_trainer_smoke_on_fashion(root, tmp_path):
    from semiseg_fast.engine.trainer import Trainer

    cfg = TrainConfig(data="fashion", root=str(root), method="fixmatch", num_train=16, num_val=4, image_size=32,
                      crop=24, batch_size=2, iters=2, eval_every=0, ckpt_every=0, log_every=1, progress=False,
                      log_backend="csv", cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"),
                      labeled="1/4", eval_batch_size=4)
    # one thread: on a machine whose cores are busy, OpenMP barriers of two threads spin (10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, echo=lambda *a: None)
        assert trainer.num_classes == 11
        metrics = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert trainer.step == 2 and len(metrics.iou) == 11
    assert math.isfinite(metrics.pixel_acc)


def test_cli_names_the_missing_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--data", "fashion", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 1  # the folder exists (a usable argument); its data is missing: a run-time failure
    err = capsys.readouterr().err
    assert err.startswith("error:") and "train-images-idx3-ubyte.gz" in err and "Traceback" not in err


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason=f"{DEFAULT_ROOT} absent (package dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    garments = load_garments("val")
    assert garments.images.shape == (10000, 28, 28) and garments.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(garments.labels, minlength=10), torch.full((10,), 1000))
    data = load_fashion("val", 4, 48, seed=0)
    assert data.images.shape == (4, 3, 48, 48)
    assert bool((data.labels.flatten(1).max(1).values > 0).all()) and int(data.labels.max()) < 11
    offset = fashion.SPLIT_OFFSETS["val"]
    for i in range(4):
        layout = scene_layout(0, offset + i, 10000, 48)
        expected, unsure = expected_labels(garments.images.numpy(), garments.labels.numpy(), layout, 48, 48)
        assert np.array_equal(data.labels[i].numpy()[~unsure], expected[~unsure])
