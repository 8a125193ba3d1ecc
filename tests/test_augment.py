"""Batched augmentations: geometry keeps images and labels aligned, photometry leaves geometry
alone, mixing moves labels (and the ignore index) with their pixels."""
import math

import pytest
import torch

from semiseg_fast.data.augment import (
    classmix_mask,
    cutmix_box,
    gaussian_blur,
    hsv_to_rgb,
    mix,
    mix_labels,
    rgb_to_hsv,
    strong_augment,
    u2pl_cutmix,
    u2pl_cutmix_mask,
    weak_augment,
)

NUM_CLASSES = 8


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def block_labels(batch, height, width, block=8, seed=0, device="cpu"):
    """Labels made of square blocks of random classes (some 255) and an image whose colour
    encodes the label, so alignment can be read back from the pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, NUM_CLASSES + 1, (batch, height // block, width // block), generator=g)
    coarse[coarse == NUM_CLASSES] = 255
    labels = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return encode(labels).to(device), labels.to(device)


def encode(labels):
    code = torch.where(labels == 255, NUM_CLASSES, labels).float() / NUM_CLASSES
    return torch.stack([code, 1 - code, torch.full_like(code, 0.5)], dim=1)


def decode(images):
    code = (images[:, 0] * NUM_CLASSES).round().long()
    return torch.where(code == NUM_CLASSES, 255, code)


def interior(labels):
    """Pixels whose 3x3 neighbourhood holds a single label (bilinear sampling is exact there)."""
    padded = torch.nn.functional.pad(labels.float().unsqueeze(1), (1, 1, 1, 1), value=-1)
    patches = torch.nn.functional.unfold(padded, 3).view(labels.shape[0], 9, *labels.shape[1:])
    return (patches == labels.unsqueeze(1)).all(dim=1)


# -- weak (geometric) ---------------------------------------------------------------------------

def test_weak_augment_keeps_images_and_labels_aligned():
    images, labels = block_labels(8, 48, 48)
    out, out_labels = weak_augment(images, labels, crop=40, generator=gen(1))
    assert out.shape == (8, 3, 40, 40) and out_labels.shape == (8, 40, 40) and out_labels.dtype == torch.int64
    core = interior(out_labels) & (out_labels != 255)
    assert core.float().mean() > 0.3
    assert torch.equal(decode(out)[core], out_labels[core])
    # labels are nearest-sampled: only values that exist in the source appear
    assert set(torch.unique(out_labels).tolist()) <= set(torch.unique(labels).tolist()) | {255}


def test_weak_augment_non_square_crop_and_uint8_input():
    images, labels = block_labels(3, 32, 48)
    as_bytes = (images * 255).round().to(torch.uint8)
    a, la = weak_augment(as_bytes, labels, crop=(24, 40), generator=gen(2))
    b, lb = weak_augment(as_bytes.float() / 255, labels, crop=(24, 40), generator=gen(2))
    assert a.shape == (3, 3, 24, 40) and a.dtype == torch.float32
    assert torch.equal(la, lb) and torch.allclose(a, b)


def test_padding_gets_ignore_label_and_black_pixels():
    images, labels = block_labels(4, 32, 32)
    labels = labels.clamp(max=NUM_CLASSES - 1)  # no 255 in the source
    images = images + 0.1  # no black in the source
    out, out_labels = weak_augment(images, labels, crop=32, scale=(0.5, 0.5), generator=gen(3))
    padded = out_labels == 255
    assert 0.65 < padded.float().mean() < 0.85  # a 16x16 image inside a 32x32 window
    assert (out[padded.unsqueeze(1).expand_as(out)] == 0).all()
    assert (out[(~padded).unsqueeze(1).expand_as(out)] > 0.05).all()
    # the unlabeled form returns the same padding as a bool mask
    out_u, pad = weak_augment(images, None, crop=32, scale=(0.5, 0.5), generator=gen(3))
    assert pad.dtype == torch.bool and torch.equal(pad, padded) and torch.equal(out_u, out)
    # the valid area is one rectangle per sample
    for p in ~pad:
        rows, cols = p.any(1).nonzero(), p.any(0).nonzero()
        assert p[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_flip_and_identity():
    images, labels = block_labels(2, 16, 24, block=4)
    images = torch.rand_like(images)
    flipped, flipped_labels = weak_augment(images, labels, crop=(16, 24), scale=(1, 1), flip_p=1.0, generator=gen())
    assert torch.equal(flipped_labels, labels.flip(-1))
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)
    same, same_labels = weak_augment(images, labels, crop=(16, 24), scale=(1, 1), flip_p=0.0, generator=gen())
    assert torch.equal(same_labels, labels) and torch.allclose(same, images, atol=1e-5)


def test_rescale_matches_interpolate():
    images, labels = block_labels(2, 16, 24, block=4)
    images = torch.rand_like(images)
    out, out_labels = weak_augment(images, labels, crop=(32, 48), scale=(2, 2), flip_p=0.0, generator=gen())
    expected = torch.nn.functional.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out_labels, labels.repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_generator_state_determines_output():
    images, labels = block_labels(4, 32, 32)
    g = gen(5)
    state = g.get_state()
    a = weak_augment(images, labels, crop=24, generator=g)
    after = g.get_state()
    g.set_state(state)
    b = weak_augment(images, labels, crop=24, generator=g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(g.get_state(), after)
    c = weak_augment(images, labels, crop=24, generator=g)  # the state moved on
    assert not torch.equal(a[1], c[1])
    assert torch.equal(strong_augment(images, gen(9)), strong_augment(images, gen(9)))
    assert torch.equal(cutmix_box(4, 16, 16, p=1, generator=gen(9)), cutmix_box(4, 16, 16, p=1, generator=gen(9)))
    assert torch.equal(classmix_mask(labels, gen(9), NUM_CLASSES), classmix_mask(labels, gen(9), NUM_CLASSES))


# -- strong (photometric) -----------------------------------------------------------------------

def test_strong_augment_is_photometric_and_in_range():
    images = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    out = strong_augment(images, gen(1), jitter_p=1.0, gray_p=0.3)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)
    # without blur it is a per-pixel colour map: moving pixels around commutes with it, so the
    # labels of the input still describe the output
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(1))
    shuffled = images.flatten(2)[:, :, perm].view_as(images)
    a = strong_augment(images, gen(2), blur_p=0.0)
    b = strong_augment(shuffled, gen(2), blur_p=0.0)
    assert torch.allclose(a.flatten(2)[:, :, perm].view_as(images), b, atol=1e-5)


def test_strong_augment_identity_gray_and_blur():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    same = strong_augment(images, gen(), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    assert torch.equal(same, images)
    gray = strong_augment(images, gen(), jitter_p=0.0, gray_p=1.0, blur_p=0.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(gray[:, 0], luma, atol=1e-6)
    blurred = strong_augment(images, gen(), jitter_p=0.0, gray_p=0.0, blur_p=1.0)
    assert (blurred.var(dim=(2, 3)) < images.var(dim=(2, 3))).all()
    assert torch.allclose(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.05)


def test_gaussian_blur_per_sample_sigma():
    images = torch.zeros(2, 1, 15, 15)
    images[:, :, 7, 7] = 1
    out = gaussian_blur(images, torch.tensor([0.5, 2.0]), radius=6)
    assert torch.allclose(out.sum(dim=(2, 3)), torch.ones(2, 1))
    assert out[0, 0, 7, 7] > out[1, 0, 7, 7]  # the narrow kernel keeps more mass at the centre
    expected = math.exp(-1 / (2 * 2.0**2))
    assert torch.allclose(out[1, 0, 7, 8] / out[1, 0, 7, 7], torch.tensor(expected), rtol=1e-4)
    flat = gaussian_blur(torch.full((2, 3, 8, 8), 0.3), torch.tensor([0.1, 2.0]), radius=6)
    assert torch.allclose(flat, torch.full_like(flat, 0.3))


def test_hsv_round_trip_and_hue_rotation():
    rgb = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    hsv = rgb_to_hsv(red)
    hsv[:, 0] += 1 / 3
    assert torch.allclose(hsv_to_rgb(hsv), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), atol=1e-6)


# -- mixing -------------------------------------------------------------------------------------

def test_cutmix_box_area_and_probability():
    none = cutmix_box(16, 32, 32, p=0.0, generator=gen())
    assert none.shape == (16, 32, 32) and none.dtype == torch.bool and not none.any()
    boxes = cutmix_box(64, 32, 32, p=1.0, generator=gen(1))
    area = boxes.float().mean(dim=(1, 2))
    assert (area <= 0.4).all() and (area >= 0.01).all()
    assert area.max() > 0.25 and area.min() < 0.1  # spans the range
    for box in boxes:
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
    half = cutmix_box(400, 16, 16, p=0.5, generator=gen(2)).flatten(1).any(1).float().mean()
    assert 0.4 < half < 0.6
    wide = cutmix_box(32, 8, 64, p=1.0, generator=gen(3))  # the ratio range is cut to what fits
    assert wide.flatten(1).any(1).all() and (wide.float().mean(dim=(1, 2)) <= 0.4).all()


def test_mix_moves_labels_with_pixels():
    images_a, labels_a = block_labels(4, 32, 32, seed=1)
    images_b, labels_b = block_labels(4, 32, 32, seed=2)
    mask = cutmix_box(4, 32, 32, p=1.0, generator=gen())
    images, labels = mix(images_a, images_b, mask), mix_labels(labels_a, labels_b, mask)
    assert torch.equal(images, torch.where(mask.unsqueeze(1), images_b, images_a))
    assert torch.equal(labels, torch.where(mask, labels_b, labels_a))
    assert torch.equal(decode(images), labels)  # 255 included
    assert torch.equal(mix(labels_a, labels_b, mask), labels)  # mix handles [B, H, W] too
    pad_a, pad_b = labels_a == 255, labels_b == 255
    assert torch.equal(mix(pad_a, pad_b, mask), labels == 255)


def test_classmix_selects_whole_classes_never_ignore():
    _, labels = block_labels(8, 32, 32, block=4, seed=3)
    for num_classes in (NUM_CLASSES, None):
        mask = classmix_mask(labels, gen(4), num_classes)
        assert mask.shape == labels.shape and mask.dtype == torch.bool
        assert not mask[labels == 255].any()
        for lab, m in zip(labels, mask):
            present = [c for c in torch.unique(lab).tolist() if c != 255]
            chosen = [c for c in present if m[lab == c].any()]
            for c in chosen:
                assert m[lab == c].all()  # a chosen class is masked everywhere
            assert len(chosen) == (len(present) + 1) // 2
            assert torch.equal(m, torch.isin(lab, torch.tensor(chosen, dtype=lab.dtype)))
    # the choice varies between samples and generator seeds
    masks = [classmix_mask(labels, gen(s), NUM_CLASSES) for s in range(4)]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


def test_classmix_handles_images_with_no_or_one_class():
    labels = torch.full((3, 8, 8), 255)
    labels[1] = 2
    labels[2, :4] = 5
    mask = classmix_mask(labels, gen(), NUM_CLASSES)
    assert not mask[0].any()
    assert mask[1].all()  # ceil(1/2) = 1: the only class is chosen
    assert torch.equal(mask[2], labels[2] == 5)


def test_u2pl_cutmix():
    assert not u2pl_cutmix_mask(4, 32, 32, p=0.0, generator=gen()).any()
    mask = u2pl_cutmix_mask(6, 32, 32, p=1.0, generator=gen(1))
    area = mask.float().mean(dim=(1, 2))
    assert torch.allclose(area, torch.full_like(area, 0.5), atol=0.03)
    coins = torch.stack([u2pl_cutmix_mask(3, 8, 8, p=0.5, generator=gen(s)).flatten(1).any(1) for s in range(40)])
    assert (coins.all(1) | ~coins.any(1)).all()  # one coin for the whole batch
    images, labels = block_labels(6, 32, 32)
    mixed_images, mixed_labels = u2pl_cutmix([images, labels], mask)
    partner = torch.tensor([1, 2, 3, 4, 5, 0])
    assert torch.equal(mixed_labels, torch.where(mask, labels[partner], labels))
    assert torch.equal(decode(mixed_images), mixed_labels)


@pytest.mark.gpu
def test_pipeline_on_cuda():
    device = "cuda"
    images, labels = block_labels(4, 32, 32, device=device)
    g = gen(0, device)
    x, y = weak_augment(images, labels, crop=24, generator=g)
    x_u, pad = weak_augment(images, None, crop=24, generator=g)
    s = strong_augment(x_u, g)
    box = cutmix_box(4, 24, 24, generator=g)
    cm = classmix_mask(y, g, NUM_CLASSES)
    um = u2pl_cutmix_mask(4, 24, 24, generator=g)
    for t in (x, y, pad, s, box, cm, um, mix(s, s.roll(1, 0), box)):
        assert t.device.type == "cuda"
    core = interior(y) & (y != 255)
    assert torch.equal(decode(x)[core], y[core])
