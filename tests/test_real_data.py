"""VOC 2012 (+SBD) and Cityscapes read from tiny file trees: mapping, protocols, splits, streams, eval, errors."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg_fast.config import TrainConfig
from semiseg_fast.data.augment import weak_augment
from semiseg_fast.data.cityscapes import CityscapesData
from semiseg_fast.data.files import read_label, sample_seed
from semiseg_fast.data.streams import IndexStream
from semiseg_fast.data.voc import VOC_CLASSES, VOCData
from semiseg_fast.engine.evaluate import ConfusionMatrix, predict, predict_sliding, val_confusion
from semiseg_fast.engine.trainer import Trainer
from semiseg_fast.errors import ConfigError, DataError

TRAIN = [f"2007_{i:06d}" for i in range(1, 7)]  # train.txt
VAL = [f"2007_{i:06d}" for i in range(101, 104)]  # val.txt
AUG_ONLY = [f"2008_{i:06d}" for i in range(1, 4)]  # only in SBD
AUG_LABELED = TRAIN[:4] + AUG_ONLY + VAL[:1]  # SegmentationClassAug pngs (SBD also labels some val images)


@pytest.fixture(autouse=True)
def _one_thread_and_restore():
    # tiny ops: several threads only spin against the training jobs sharing this machine's cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if torch.are_deterministic_algorithms_enabled():  # the first call of this costs seconds
        torch.use_deterministic_algorithms(False)


def _palette() -> list[int]:
    pal = []
    for i in range(256):  # the VOC colour map
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _blocks(rng, h, w, values) -> np.ndarray:
    lab = np.zeros((h, w), dtype=np.uint8)
    for y0 in range(0, h, 10):
        for x0 in range(0, w, 10):
            lab[y0:y0 + 10, x0:x0 + 10] = rng.choice(values)
    return lab


def _save_palette(path, lab):
    im = Image.fromarray(lab, mode="P")
    im.putpalette(_palette())
    im.save(path)


def make_voc(root, aug=True, sizes=None):
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if aug:
        (root / "SegmentationClassAug").mkdir()
    sizes = sizes or {}
    for k, ident in enumerate(TRAIN + VAL + AUG_ONLY):
        h, w = sizes.get(ident, (40 + (k % 3) * 2, 50 - (k % 2) * 4))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{ident}.jpg")
        if ident in TRAIN + VAL:
            lab = _blocks(rng, h, w, np.arange(21))
            lab[:2], lab[:, -2:] = 255, 255  # VOC boundary pixels
            _save_palette(root / "SegmentationClass" / f"{ident}.png", lab)
        if aug and ident in AUG_LABELED:
            Image.fromarray(_blocks(rng, h, w, np.arange(21)), mode="L").save(root / "SegmentationClassAug" / f"{ident}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(VAL) + "\n")
    return root


CITY_IDS = [0, 1, 4, 6, 7, 8, 9, 11, 17, 21, 23, 24, 26, 28, 29, 30, 31, 33, 255]


def make_cityscapes(root):
    rng = np.random.default_rng(1)
    layout = {"train": {"aachen": 3, "bochum": 3}, "val": {"frankfurt": 2}}
    for split, cities in layout.items():
        for city, n in cities.items():
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for i in range(n):
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                    root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(_blocks(rng, 40, 50, CITY_IDS), mode="L").save(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    # one image also has a labelTrainIds file, which wins
    Image.fromarray(np.full((40, 50), 5, np.uint8), mode="L").save(
        root / "gtFine/train/bochum/bochum_000001_000019_gtFine_labelTrainIds.png")
    return root


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(tmp_path / "VOC2012")


@pytest.fixture
def city_root(tmp_path):
    return make_cityscapes(tmp_path / "cityscapes")


def voc(root, **kw):
    kw.setdefault("num_workers", 0)
    return VOCData(root, **kw)


class PixelModel(torch.nn.Module):
    """Translation-invariant per pixel (1x1 conv) or with context (3x3): returns {"logits": ...}."""

    def __init__(self, classes, kernel=1):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, classes, kernel, padding=kernel // 2)

    def forward(self, x):
        return {"logits": self.conv(x)}


# -- labels ---------------------------------------------------------------------------------------

def test_cityscapes_label_mapping_and_train_ids_preferred(city_root):
    hand = {7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13, 28: 15, 31: 16, 33: 18,
            0: 255, 1: 255, 4: 255, 6: 255, 9: 255, 29: 255, 30: 255, 255: 255}
    data = CityscapesData(city_root, num_workers=0)
    assert data.num_classes == 19 and data.class_names[0] == "road" and data.class_names[18] == "bicycle"
    assert data.num_train == 6 and data.num_val == 2
    sample = next(s for s in data.train if s.id == "aachen_000000_000019")
    raw = np.array(Image.open(sample.label))
    mapped = read_label(sample.label, sample.codec)
    assert set(np.unique(raw)) - set(hand) == set()
    for raw_id, train_id in hand.items():
        assert (mapped[raw == raw_id] == train_id).all(), raw_id
    assert sample.codec.lut.shape == (256,)
    preferred = next(s for s in data.train if s.id == "bochum_000001_000019")
    assert preferred.label.name.endswith("_gtFine_labelTrainIds.png")
    assert (read_label(preferred.label, preferred.codec) == 5).all()


def test_voc_palette_labels_read_as_indices(voc_root):
    data = voc(voc_root)
    assert data.num_classes == 21 and data.class_names == VOC_CLASSES and data.ignore_index == 255
    sample = data.val[0]
    with Image.open(sample.label) as im:
        assert im.mode == "P"
    lab = read_label(sample.label, sample.codec)
    assert lab.dtype == np.uint8 and (lab[:2] == 255).all() and lab.max() == 255 and lab[2:, :-2].max() < 21


# -- protocols and splits ---------------------------------------------------------------------------

def test_voc_pool_labels_and_protocols(voc_root, tmp_path):
    data = voc(voc_root)
    assert data.protocol == "blended"
    assert data.train_ids == sorted(TRAIN + AUG_ONLY)  # the SBD label of a val image never enters training
    labels = {s.id: s.label.parent.name for s in data.train}
    assert all(labels[i] == "SegmentationClassAug" for i in TRAIN[:4] + AUG_ONLY)
    assert all(labels[i] == "SegmentationClass" for i in TRAIN[4:])
    lab, unl = data.split(1 / 3, seed=0)
    assert lab.numel() == 3 and unl.numel() == 6 and set(lab.tolist()) | set(unl.tolist()) == set(range(9))

    classic = voc(voc_root, protocol="classic")
    for seed in range(5):
        lab, unl = classic.split(3, seed=seed)
        ids = {classic.train_ids[i] for i in lab.tolist()}
        assert len(ids) == 3 and ids <= set(TRAIN)
        assert unl.numel() == 6  # the rest of the pool, SBD-only images included
    with pytest.raises(ConfigError, match="--labeled"):
        classic.split(7, seed=0)  # more than the 6 train.txt images

    # without SBD: classic by default, the pool is train.txt; blended is refused
    plain = tmp_path / "plain"
    shutil.copytree(voc_root, plain)
    shutil.rmtree(plain / "SegmentationClassAug")
    data = voc(plain)
    assert data.protocol == "classic" and data.train_ids == TRAIN
    with pytest.raises(ConfigError, match="SegmentationClassAug"):
        voc(plain, protocol="blended")
    # train_aug.txt names the aug pool when present
    (voc_root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(TRAIN + AUG_ONLY[:2]) + "\n")
    assert voc(voc_root).train_ids == sorted(TRAIN + AUG_ONLY[:2])


def test_cityscapes_fractions(city_root):
    data = CityscapesData(city_root, num_workers=0)
    for frac, count in ((1 / 2, 3), (1 / 4, 2), (1 / 16, 1)):
        lab, unl = data.split(frac, seed=1)
        assert lab.numel() == count and unl.numel() == 6 - count


def test_splits_are_seeded_written_and_reusable(voc_root, tmp_path):
    data = voc(voc_root)
    a = data.split(1 / 3, seed=4, run_dir=tmp_path / "run")
    b = data.split(1 / 3, seed=4, run_dir=tmp_path / "run")  # same content: the files are kept as they are
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], data.split(1 / 3, seed=5)[0])
    assert set(a[0].tolist()) <= set(data.split(2 / 3, seed=4)[0].tolist())  # nested
    files = tmp_path / "run" / "splits"
    assert (files / "labeled.txt").read_text().split() == [data.train_ids[i] for i in a[0].tolist()]
    assert (files / "unlabeled.txt").read_text().split() == [data.train_ids[i] for i in a[1].tolist()]
    assert not list(files.glob(".*"))  # no temporary files left

    reused = voc(voc_root, splits_dir=files).split(1 / 16, seed=99, run_dir=tmp_path / "run2")
    assert all(torch.equal(x, y) for x, y in zip(a, reused))
    assert (tmp_path / "run2/splits/labeled.txt").read_text() == (files / "labeled.txt").read_text()
    voc(voc_root, splits_dir=files).split(1 / 16, seed=99, run_dir=tmp_path / "run")  # its own folder: fine

    # a different split never replaces the saved one
    before = (files / "labeled.txt").read_text()
    with pytest.raises(DataError, match="labeled.txt"):
        data.split(1 / 3, seed=5, run_dir=tmp_path / "run")
    assert (files / "labeled.txt").read_text() == before

    # UniMatch-style lines; unlabeled.txt left out = the rest
    uni = tmp_path / "uni"
    uni.mkdir()
    (uni / "labeled.txt").write_text(f"JPEGImages/{TRAIN[0]}.jpg SegmentationClass/{TRAIN[0]}.png\n"
                                     f"JPEGImages/{AUG_ONLY[1]}.jpg SegmentationClassAug/{AUG_ONLY[1]}.png\n")
    lab, unl = voc(voc_root, splits_dir=uni).split(1 / 2, seed=0)
    assert [data.train_ids[i] for i in lab.tolist()] == sorted([TRAIN[0], AUG_ONLY[1]]) and unl.numel() == 7


def test_split_files_are_validated(voc_root, tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "labeled.txt").write_text(f"{TRAIN[0]}\n2099_000001\n")
    with pytest.raises(DataError, match=r"labeled.txt:2: image '2099_000001'"):
        voc(voc_root, splits_dir=folder).split(1, 0)
    (folder / "labeled.txt").write_text(f"{TRAIN[0]}\n{VAL[0]}\n")
    with pytest.raises(DataError, match="validation image"):
        voc(voc_root, splits_dir=folder).split(1, 0)
    (folder / "labeled.txt").write_text(f"{TRAIN[0]}\n{TRAIN[1]}\n")
    (folder / "unlabeled.txt").write_text(f"{TRAIN[1]}\n{TRAIN[2]}\n")
    with pytest.raises(DataError, match=rf"unlabeled.txt:1: image '{TRAIN[1]}' is listed again"):
        voc(voc_root, splits_dir=folder).split(1, 0)
    with pytest.raises(ConfigError, match="--splits: .*nowhere"):  # a bad argument: a usage error
        voc(voc_root, splits_dir=tmp_path / "nowhere").split(1, 0)
    # an SBD-free copy: images without any label cannot be labeled
    (voc_root / "ImageSets/Segmentation/train_aug.txt").write_text("\n".join(TRAIN + AUG_ONLY) + "\n")
    shutil.rmtree(voc_root / "SegmentationClassAug")
    (folder / "labeled.txt").write_text(f"{AUG_ONLY[0]}\n")
    (folder / "unlabeled.txt").unlink()
    with pytest.raises(DataError, match=rf"{AUG_ONLY[0]}.jpg.*no label file"):
        voc(voc_root, splits_dir=folder).split(1, 0)


# -- training streams -------------------------------------------------------------------------------

def _take(stream, n):
    return [stream.next(None) for _ in range(n)]


def _same(batches_a, batches_b):
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b))


def test_stream_batches_semantics_determinism_resume(voc_root):
    data = voc(voc_root)
    idx = torch.arange(data.num_train)
    rng_before = torch.get_rng_state()
    stream = data.train_stream(idx, labeled=True, batch_size=3, seed=5, crop=48, device="cpu")
    x, y = stream.next(None)
    assert x.shape == (3, 3, 48, 48) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (3, 48, 48) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= set(range(21)) | {255}
    # each sample is weak_augment of its own file with its own (seed, epoch, position) generator
    order = IndexStream(idx, 3, 5).next()
    for k, i in enumerate(order.tolist()):
        s = data.train[i]
        img = torch.from_numpy(np.array(Image.open(s.image).convert("RGB"))).permute(2, 0, 1)
        lab = torch.from_numpy(np.array(Image.open(s.label)))
        ex, ey = weak_augment(img[None], lab[None], 48, generator=torch.Generator().manual_seed(sample_seed(5, 0, k)))
        assert torch.equal(ex[0], x[k]) and torch.equal(ey[0], y[k])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never touched

    # padding: a crop larger than any rescaled image (2 x 50 < 120) always pads
    lab_s = data.train_stream(idx, labeled=True, batch_size=4, seed=1, crop=120, device="cpu")
    unl_s = data.train_stream(idx, labeled=False, batch_size=4, seed=1, crop=120, device="cpu")
    (xl, yl), (xu, pad) = lab_s.next(None), unl_s.next(None)
    assert pad.dtype == torch.bool and pad.shape == (4, 120, 120)
    assert pad.flatten(1).any(1).all() and (~pad).flatten(1).any(1).all()
    assert torch.equal(xl, xu) and (yl[pad] == 255).all() and (xl.permute(1, 0, 2, 3)[:, pad] == 0).all()
    assert (yl[~pad] != 255).any()

    # determinism and exact resume (9 images, batch 4: batches span epochs)
    full = _take(data.train_stream(idx, labeled=True, batch_size=4, seed=2, crop=32, device="cpu"), 5)
    assert _same(full, _take(data.train_stream(idx, labeled=True, batch_size=4, seed=2, crop=32, device="cpu"), 5))
    first = data.train_stream(idx, labeled=True, batch_size=4, seed=2, crop=32, device="cpu")
    _take(first, 2)
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 8}
    resumed = data.train_stream(idx, labeled=True, batch_size=4, seed=2, crop=32, device="cpu")
    resumed.load_state_dict(state)
    assert _same(full[2:], _take(resumed, 3))

    # DDP: world=2 ranks of batch 2 == one process with batch 4
    ranks = [data.train_stream(idx, labeled=False, batch_size=2, seed=6, crop=32, device="cpu", rank=r, world=2)
             for r in range(2)]
    single = data.train_stream(idx, labeled=False, batch_size=4, seed=6, crop=32, device="cpu")
    for _ in range(4):
        (x0, p0), (x1, p1), (xs, ps) = ranks[0].next(None), ranks[1].next(None), single.next(None)
        assert torch.equal(torch.cat([x0, x1]), xs) and torch.equal(torch.cat([p0, p1]), ps)


def test_stream_with_worker_processes(voc_root):
    data = voc(voc_root, num_workers=2)
    idx = torch.arange(data.num_train)
    ref = _take(voc(voc_root).train_stream(idx, labeled=True, batch_size=2, seed=3, crop=32, device="cpu"), 6)
    stream = data.train_stream(idx, labeled=True, batch_size=2, seed=3, crop=32, device="cpu")
    assert _same(ref[:3], _take(stream, 3))
    assert stream.state_dict() == {"epoch": 0, "position": 6}  # consumed, not prefetched
    state = stream.state_dict()
    _take(stream, 1)
    stream.load_state_dict(state)  # restarts the workers at the consumed position
    assert _same(ref[3:], _take(stream, 3))
    stream.close()

    # a bad file met in a worker comes back as a DataError naming it
    bad = data.train[0].image
    bad.write_bytes(b"not a jpeg at all")
    stream = data.train_stream(torch.tensor([0]), labeled=True, batch_size=1, seed=0, crop=32, device="cpu")
    with pytest.raises(DataError, match=bad.name):
        stream.next(None)


# -- evaluation -------------------------------------------------------------------------------------

def test_sliding_window_matches_whole_image_and_unimatch():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 37, 53)
    pixel = PixelModel(5).eval()
    whole = predict(pixel, images)
    for window, stride in ((16, 10), (20, None), (37, 7)):
        for bs in (1, 3, 64):
            assert torch.equal(predict_sliding(pixel, images, window, stride, batch_size=bs), whole)
    assert torch.equal(predict_sliding(pixel, images, 0), whole)
    assert torch.equal(predict_sliding(pixel, images, 64), whole)  # fits: whole image

    # with context (3x3 conv) the windows matter: compare with UniMatch's loop (softmax summed)
    context = PixelModel(5, kernel=3).eval()
    grid, step = 16, int(16 * 2 / 3)
    final = torch.zeros(2, 5, 37, 53)
    row = 0
    while row < 37:
        col = 0
        while col < 53:
            window = images[:, :, row:min(37, row + grid), col:min(53, col + grid)]
            final[:, :, row:min(37, row + grid), col:min(53, col + grid)] += context(window)["logits"].softmax(1)
            col += step
        row += step
    with torch.no_grad():
        assert torch.equal(predict_sliding(context, images, grid), final.argmax(1))
        assert not torch.equal(predict_sliding(context, images, grid), predict(context, images))


def _direct_confusion(model, samples, classes):
    cm = ConfusionMatrix(classes)
    for s in samples:
        img = torch.from_numpy(np.array(Image.open(s.image).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        lab = torch.from_numpy(read_label(s.label, s.codec))[None].long()
        cm.update(predict(model, img), lab)
    return cm.mat


def test_val_confusion_matches_direct_computation(voc_root, city_root):
    sizes = {VAL[0]: (61, 45)}  # one validation image larger than the window
    root = make_voc(voc_root.parent / "sized", sizes=sizes)
    model = PixelModel(21)
    for window in (0, 24):
        data = voc(root, eval_window=window, eval_stride=None)
        mat = val_confusion(data, model, batch_size=4, device="cpu")
        expected = _direct_confusion(model, data.val, 21)
        assert mat.dtype == torch.int64 and torch.equal(mat, expected) and mat.sum() > 0
        shards = [val_confusion(data, model, batch_size=4, device="cpu", rank=r, world=2) for r in range(2)]
        assert torch.equal(shards[0] + shards[1], mat)
    assert model.training  # the prior mode is restored
    city = CityscapesData(city_root, num_workers=0, eval_window=32)
    cmodel = PixelModel(19)
    assert torch.equal(val_confusion(city, cmodel, batch_size=2, device="cpu"), _direct_confusion(cmodel, city.val, 19))


# -- bad input --------------------------------------------------------------------------------------

def test_missing_folders_and_lists(tmp_path, voc_root, city_root):
    with pytest.raises(DataError, match="nope"):
        voc(tmp_path / "nope")
    for remove, name in (("ImageSets/Segmentation/val.txt", "val.txt"), ("ImageSets/Segmentation/train.txt", "train.txt"),
                         (f"JPEGImages/{AUG_ONLY[0]}.jpg", f"{AUG_ONLY[0]}.jpg"),
                         (f"SegmentationClass/{VAL[1]}.png", f"{VAL[1]}.png"),
                         ("JPEGImages", "JPEGImages")):
        copy = tmp_path / f"copy_{name}"
        shutil.copytree(voc_root, copy)
        path = copy / remove
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        with pytest.raises(DataError, match=name):
            voc(copy)
    with pytest.raises(DataError, match="gtFine"):
        copy = tmp_path / "city_nogt"
        shutil.copytree(city_root, copy)
        shutil.rmtree(copy / "gtFine")
        CityscapesData(copy)
    (city_root / "gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="frankfurt_000001_000019_gtFine_labelIds.png"):
        CityscapesData(city_root)


def test_bad_files_name_the_file(voc_root, city_root):
    data = voc(voc_root)
    model = PixelModel(21)

    def first_batch(sample_id):
        i = data.train_ids.index(sample_id)
        return data.train_stream(torch.tensor([i]), labeled=True, batch_size=1, seed=0, crop=32, device="cpu").next(None)

    # a label value outside [0, 21) other than 255
    path = voc_root / "SegmentationClass" / f"{TRAIN[4]}.png"
    lab = np.array(Image.open(path))
    lab[5, 5] = 30
    _save_palette(path, lab)
    with pytest.raises(DataError, match=rf"{TRAIN[4]}.png: label value 30"):
        first_batch(TRAIN[4])
    # image and label of different sizes
    Image.fromarray(np.zeros((12, 13), np.uint8), mode="L").save(voc_root / "SegmentationClassAug" / f"{TRAIN[0]}.png")
    with pytest.raises(DataError, match=rf"{TRAIN[0]}.png: label is 13x12"):
        first_batch(TRAIN[0])
    # an RGB rendering instead of an index map
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(voc_root / "SegmentationClassAug" / f"{TRAIN[1]}.png")
    with pytest.raises(DataError, match=rf"{TRAIN[1]}.png: label image has mode 'RGB'"):
        first_batch(TRAIN[1])
    # a corrupt (truncated) image, in training and in validation
    jpg = voc_root / "JPEGImages" / f"{TRAIN[2]}.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"{TRAIN[2]}.jpg: cannot read the image"):
        first_batch(TRAIN[2])
    (voc_root / "JPEGImages" / f"{VAL[2]}.jpg").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=rf"{VAL[2]}.jpg"):
        val_confusion(data, model, batch_size=1, device="cpu")
    # a Cityscapes labelId that does not exist
    city = CityscapesData(city_root, num_workers=0)
    sample = city.train[0]
    Image.fromarray(np.full((40, 50), 40, np.uint8), mode="L").save(sample.label)
    with pytest.raises(DataError, match=rf"{sample.label.name}: label value 40"):
        city.train_stream(torch.tensor([0]), labeled=True, batch_size=1, seed=0, crop=32, device="cpu").next(None)


def test_config_checks(voc_root, city_root, tmp_path):
    with pytest.raises(ConfigError, match="--protocol"):
        TrainConfig(data="cityscapes", root=str(city_root), protocol="classic").validate()
    with pytest.raises(ConfigError, match="--protocol"):
        TrainConfig(data="voc", root=str(voc_root), protocol="mixed").validate()
    with pytest.raises(ConfigError, match="--eval-stride"):
        TrainConfig(data="cityscapes", root=str(city_root), crop=32, eval_stride=40).validate()
    with pytest.raises(ConfigError, match="--splits"):
        TrainConfig(data="synthetic", splits=str(tmp_path)).validate()


# -- end to end ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["voc", "cityscapes"])
def test_trainer_smoke(name, voc_root, city_root, tmp_path):
    root = voc_root if name == "voc" else city_root
    cfg = TrainConfig(method="fixmatch", data=name, root=str(root), backbone="resnet18", crop=32, batch_size=2,
                      iters=2, eval_every=0, ckpt_every=0, log_every=1, progress=False, log_backend="csv",
                      out=str(tmp_path / "run"), labeled="3", num_workers=0, eval_batch_size=4, cache_dir=None)
    trainer = Trainer(cfg, echo=lambda *a: None)
    metrics = trainer.train()
    assert trainer.step == 2 and len(metrics.iou) == trainer.num_classes == (21 if name == "voc" else 19)
    assert int(metrics.confusion.sum()) > 0
    assert len((tmp_path / "run/splits/labeled.txt").read_text().split()) == 3
    assert trainer.state_dict()["streams"]["labeled"] == {"epoch": 1, "position": 1}  # 2 steps x 2 of 3


def test_trainer_exact_resume_on_files(voc_root, tmp_path):
    def cfg(out):
        return TrainConfig(method="fixmatch", data="voc", root=str(voc_root), crop=32, batch_size=2, iters=4,
                           eval_every=0, ckpt_every=0, log_every=1, progress=False, log_backend="csv", out=str(out),
                           labeled="3", num_workers=0, eval_batch_size=4, cache_dir=None, deterministic=True)
    a = Trainer(cfg(tmp_path / "a"), echo=lambda *x: None)
    a.train()
    Trainer(cfg(tmp_path / "b"), echo=lambda *x: None).train(max_steps=2)
    resumed = cfg(tmp_path / "b")
    resumed.resume = True
    b = Trainer(resumed, echo=lambda *x: None)
    assert b.step == 2
    b.train()
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {k: s.state_dict() for k, s in a.streams.items()} == {k: s.state_dict() for k, s in b.streams.items()}


@pytest.mark.gpu
def test_stream_on_cuda_pinned_and_sync_free(voc_root):
    # worker processes + pinned memory: the batch lands on the GPU without a host sync, and equals
    # the CPU stream's batch
    data = voc(voc_root, num_workers=2)
    idx = torch.arange(data.num_train)
    ref = _take(voc(voc_root).train_stream(idx, labeled=True, batch_size=2, seed=3, crop=32, device="cpu"), 2)
    stream = data.train_stream(idx, labeled=True, batch_size=2, seed=3, crop=32, device=torch.device("cuda"))
    stream.next(None)  # start the workers outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, y = stream.next(None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.is_cuda and y.is_cuda
    assert torch.equal(x.cpu(), ref[1][0]) and torch.equal(y.cpu(), ref[1][1])
    stream.close()
