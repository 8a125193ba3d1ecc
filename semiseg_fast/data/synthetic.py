"""An embedded segmentation benchmark, generated deterministically from a seed at any resolution.

Every scene is a textured, gradient-lit background with clutter and 2-5 overlapping objects.
Classes are told apart by the *combination* of shape, texture and colour family. Every colour
family is used by two or three classes, and the clutter uses all the other combinations of the
same cues, so for every class any two of its cues also occur with a different third cue: the
network has to learn all three and cannot read the class off the colour of a pixel.

    id  name                    shape      texture  colour
    0   background              -          -        -      (gradient + pattern, plus clutter)
    1   warm_striped_disc       ellipse    stripes  warm
    2   warm_striped_box        rectangle  stripes  warm   (only the shape separates 1 and 2)
    3   warm_dotted_triangle    triangle   dots     warm
    4   cool_dotted_disc        ellipse    dots     cool
    5   green_flat_ring         ring       flat     green
    6   green_checker_box       rectangle  checker  green
    7   cool_checker_cross      cross      checker  cool

Colour families are hue ranges (warm = red..orange, green, cool = cyan..blue) with saturation and
value jitter. Clutter, labelled background, is 1-3 "distractor" blobs drawn from the 53
(shape, texture, colour) combinations that are *not* in the table (e.g. a warm striped triangle,
a cool flat disc) plus 0-2 thin flat lines; distractors are smaller on average (half-size
0.05-0.12 of the image side against 0.11-0.22 for objects) but the ranges overlap. Objects
vary in size, aspect, rotation and colour; everything is drawn in a random depth order and the
last-drawn shape owns a pixel's label, so objects occlude each other and clutter can occlude
objects. Each image then gets a brightness gradient, a contrast change and pixel noise.

Determinism. Image ``i`` of seed ``s`` draws all its scene parameters from its own
``torch.Generator`` seeded by a 64-bit mix of ``(s, i)``, so it is the same whether generated
alone or in any batch. Scene parameters live in normalised coordinates and are drawn before the
(resolution dependent) pixel noise, so one seed gives the same scene at every resolution. The
pixel-level rendering uses only exactly-rounded arithmetic (+, -, *, /, sqrt, floor, comparisons):
vectorised and scalar CPU code paths agree bit for bit on those, which is not guaranteed for
sin/cos/exp, so angles come from a table (1/4096 turn steps) and nothing else is transcendental.
The random numbers are the CPU generator's uniforms (exact), so the data are also the same on
every machine, for a given torch version.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..fileio import atomic_save
from .augment import hsv_to_rgb

__all__ = [
    "CLASS_NAMES",
    "CLASS_TABLE",
    "GENERATOR_VERSION",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "SPLIT_OFFSETS",
    "SyntheticSegmentation",
    "generate_scenes",
    "load_synthetic",
]

#: Bump whenever a change alters the generated pixels, so stale cache files are never read.
GENERATOR_VERSION = 1

IGNORE_INDEX = 255

SHAPES = ("ellipse", "rectangle", "triangle", "ring", "cross")
TEXTURES = ("flat", "stripes", "checker", "dots")
COLOUR_HUES = {"warm": (-0.04, 0.09), "green": (0.23, 0.40), "cool": (0.52, 0.68)}
COLOURS = tuple(COLOUR_HUES)

#: (name, shape, texture, colour family) of the object classes; background is class 0.
CLASS_TABLE = (
    ("warm_striped_disc", "ellipse", "stripes", "warm"),
    ("warm_striped_box", "rectangle", "stripes", "warm"),
    ("warm_dotted_triangle", "triangle", "dots", "warm"),
    ("cool_dotted_disc", "ellipse", "dots", "cool"),
    ("green_flat_ring", "ring", "flat", "green"),
    ("green_checker_box", "rectangle", "checker", "green"),
    ("cool_checker_cross", "cross", "checker", "cool"),
)
CLASS_NAMES = ("background",) + tuple(row[0] for row in CLASS_TABLE)
NUM_CLASSES = len(CLASS_NAMES)

# Clutter must never look like a class, so it only uses the combinations no class owns.
_CLASS_COMBOS = {row[1:] for row in CLASS_TABLE}
_DISTRACTOR_COMBOS = tuple(
    (shape, texture, colour)
    for shape in SHAPES
    for texture in TEXTURES
    for colour in COLOURS
    if (shape, texture, colour) not in _CLASS_COMBOS
)

#: Index offsets of the splits in the scene stream; val scenes never coincide with train scenes.
SPLIT_OFFSETS = {"train": 0, "val": 1 << 40}

# Slot layout of a scene: fixed-size so every image draws the same number of random numbers.
_NUM_OBJECTS, _NUM_DISTRACTORS, _NUM_LINES = 5, 4, 3
_NUM_SLOTS = _NUM_OBJECTS + _NUM_DISTRACTORS + _NUM_LINES
_SLOT_DRAWS = 15
_GLOBAL_DRAWS = 23

_FIELDS = (
    "cx", "cy", "cos", "sin", "inv_sx", "inv_sy", "inv_period", "phase_u", "phase_v",
    "r", "g", "b", "r2", "g2", "b2", "extra", "shape", "texture", "label", "active",
)
_F = {name: i for i, name in enumerate(_FIELDS)}
_GLOBALS = (
    "bg_r1", "bg_g1", "bg_b1", "bg_r2", "bg_g2", "bg_b2", "grad_cos", "grad_sin",
    "pat1_kx", "pat1_ky", "pat1_phase", "pat1_amp", "pat2_kx", "pat2_ky", "pat2_phase", "pat2_amp",
    "gain", "gain_kx", "gain_ky", "contrast", "noise",
)
_G = {name: i for i, name in enumerate(_GLOBALS)}

_DOT_RADIUS2 = 0.32**2  # dot radius as a fraction of the texture period, squared
_SQRT3 = math.sqrt(3.0)


def _table(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Lookup tables from the categorical draws to shape / texture / colour ids.
_CLASS_SHAPE = _table([SHAPES.index(r[1]) for r in CLASS_TABLE])
_CLASS_TEXTURE = _table([TEXTURES.index(r[2]) for r in CLASS_TABLE])
_CLASS_COLOUR = _table([COLOURS.index(r[3]) for r in CLASS_TABLE])
_DIS_SHAPE = _table([SHAPES.index(c[0]) for c in _DISTRACTOR_COMBOS])
_DIS_TEXTURE = _table([TEXTURES.index(c[1]) for c in _DISTRACTOR_COMBOS])
_DIS_COLOUR = _table([COLOURS.index(c[2]) for c in _DISTRACTOR_COMBOS])
_HUE_LO = _table([COLOUR_HUES[c][0] for c in COLOURS])
_HUE_HI = _table([COLOUR_HUES[c][1] for c in COLOURS])


def _image_seed(seed: int, index: int) -> int:
    """A well-spread 63-bit seed from (seed, index): splitmix64 over a combined word.

    Python's ``hash`` is salted per process, so it cannot be used; nearby seeds and indices must
    still give unrelated generators, hence the finaliser rather than ``seed * K + index``.
    """
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


def _uniform(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def _pick(u: torch.Tensor, count: int) -> torch.Tensor:
    return (u * count).floor().clamp(max=count - 1).long()


# Angles are quantised to 1/4096 turn and read from a table: batched sin/cos may differ in the
# last bit between vectorised and scalar code paths, table look-ups cannot.
_ANGLE_STEPS = 4096
_COS = _table([math.cos(2 * math.pi * k / _ANGLE_STEPS) for k in range(_ANGLE_STEPS)])
_SIN = _table([math.sin(2 * math.pi * k / _ANGLE_STEPS) for k in range(_ANGLE_STEPS)])


def _rotation(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = _pick(u, _ANGLE_STEPS)
    return _COS[k], _SIN[k]


def _hsv_rows(hsv: torch.Tensor) -> torch.Tensor:
    """RGB [..., 3] from HSV [..., 3]."""
    return hsv_to_rgb(hsv.unsqueeze(-1).unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _draws(seed: int, index: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All random numbers of one image: scene uniforms first (resolution free), then the noise."""
    generator = torch.Generator().manual_seed(_image_seed(seed, index))
    uniforms = torch.rand(_NUM_SLOTS * _SLOT_DRAWS + _GLOBAL_DRAWS, generator=generator, dtype=torch.float64)
    # Triangular noise with unit variance: unlike randn (whose vectorised log/cos differ between
    # CPUs) it is exact arithmetic on the generator's bits, so every machine renders the same pixels.
    pair = torch.rand(2, 3, height, width, generator=generator)
    return uniforms, (pair[0] - pair[1]) * math.sqrt(6.0)


def _scene_params(uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scene parameters of a batch of images from their uniforms [n, D].

    Returns slots [n, S, len(_FIELDS)] in depth order and globals [n, len(_GLOBALS)], float32.
    Row i depends only on uniforms[i] and only exactly rounded operations are used, so batching
    never changes a value.
    """
    n = uniforms.shape[0]
    u = uniforms[:, : _NUM_SLOTS * _SLOT_DRAWS].reshape(n, _NUM_SLOTS, _SLOT_DRAWS)
    v = uniforms[:, _NUM_SLOTS * _SLOT_DRAWS:]
    slot = torch.arange(_NUM_SLOTS).view(1, -1)
    is_obj = slot < _NUM_OBJECTS
    is_line = slot >= _NUM_OBJECTS + _NUM_DISTRACTORS
    is_dis = ~is_obj & ~is_line
    n_obj = 2 + _pick(v[:, 0:1], 4)
    n_dis = 1 + _pick(v[:, 1:2], 3)
    n_line = _pick(v[:, 2:3], 3)
    first_line = _NUM_OBJECTS + _NUM_DISTRACTORS
    active = torch.where(is_obj, slot < n_obj,
                         torch.where(is_dis, slot - _NUM_OBJECTS < n_dis, slot - first_line < n_line))

    cls = _pick(u[..., 13], len(CLASS_TABLE))
    combo = _pick(u[..., 13], len(_DISTRACTOR_COMBOS))
    line_colour = _pick(u[..., 13], len(COLOURS)).double()
    rect, flat = float(SHAPES.index("rectangle")), float(TEXTURES.index("flat"))
    shape = torch.where(is_obj, _CLASS_SHAPE[cls], torch.where(is_dis, _DIS_SHAPE[combo], rect))
    texture = torch.where(is_obj, _CLASS_TEXTURE[cls], torch.where(is_dis, _DIS_TEXTURE[combo], flat))
    colour = torch.where(is_obj, _CLASS_COLOUR[cls], torch.where(is_dis, _DIS_COLOUR[combo], line_colour)).long()
    label = torch.where(is_obj, (cls + 1).double(), 0.0)

    # Half-extents in normalised image units; lines are long thin rectangles.
    size = torch.where(is_obj, _uniform(u[..., 2], 0.11, 0.22), _uniform(u[..., 2], 0.05, 0.12))
    root_aspect = _uniform(u[..., 3], 0.8, 1.25)  # aspect sx/sy in [0.64, 1.56]
    sx = torch.where(is_line, _uniform(u[..., 2], 0.12, 0.3), size * root_aspect)
    sy = torch.where(is_line, _uniform(u[..., 3], 0.012, 0.022), size / root_aspect)
    cos, sin = _rotation(u[..., 4])
    ring, cross = float(SHAPES.index("ring")), float(SHAPES.index("cross"))
    inner = _uniform(u[..., 12], 0.4, 0.6)  # ring: inner radius (stored squared)
    arm = _uniform(u[..., 12], 0.3, 0.42)  # cross: half-width of the bars
    extra = torch.where(shape == ring, inner * inner, torch.where(shape == cross, arm, 0.0))

    hue = _HUE_LO[colour] + (_HUE_HI[colour] - _HUE_LO[colour]) * u[..., 8]
    sat = torch.where(is_line, _uniform(u[..., 9], 0.3, 0.9), _uniform(u[..., 9], 0.55, 0.95))
    val = torch.where(is_line, _uniform(u[..., 10], 0.3, 0.95), _uniform(u[..., 10], 0.55, 0.95))
    rgb = _hsv_rows(torch.stack([hue, sat, val], dim=-1))
    rgb2 = rgb * _uniform(u[..., 11], 0.3, 0.5).unsqueeze(-1)  # the darker tone of the texture

    slots = torch.stack([
        _uniform(u[..., 0], 0.08, 0.92), _uniform(u[..., 1], 0.08, 0.92), cos, sin,
        1.0 / sx, 1.0 / sy, 1.0 / _uniform(u[..., 5], 0.09, 0.125), u[..., 6], u[..., 7],
        rgb[..., 0], rgb[..., 1], rgb[..., 2], rgb2[..., 0], rgb2[..., 1], rgb2[..., 2],
        extra, shape, texture, label, active.double(),
    ], dim=-1)
    order = u[..., 14].argsort(dim=1)
    slots = slots.gather(1, order.unsqueeze(-1).expand_as(slots))

    bg_hsv = torch.stack([v[:, [3, 6]], _uniform(v[:, [4, 7]], 0.05, 0.45), _uniform(v[:, [5, 8]], 0.25, 0.85)], dim=-1)
    bg = _hsv_rows(bg_hsv)  # [n, 2, 3]
    grad_cos, grad_sin = _rotation(v[:, 9])
    pat1_cos, pat1_sin = _rotation(v[:, 11])
    pat2_cos, pat2_sin = _rotation(v[:, 15])
    light_cos, light_sin = _rotation(v[:, 20])
    freq1, freq2 = _uniform(v[:, 10], 2.0, 6.0), _uniform(v[:, 14], 2.0, 6.0)
    slope = _uniform(v[:, 19], -0.7, 0.7)
    glob = torch.stack([
        bg[:, 0, 0], bg[:, 0, 1], bg[:, 0, 2], bg[:, 1, 0], bg[:, 1, 1], bg[:, 1, 2], grad_cos, grad_sin,
        freq1 * pat1_cos, freq1 * pat1_sin, v[:, 12], _uniform(v[:, 13], 0.0, 0.3),
        freq2 * pat2_cos, freq2 * pat2_sin, v[:, 16], _uniform(v[:, 17], 0.0, 0.3),
        _uniform(v[:, 18], 0.75, 1.2), slope * light_cos, slope * light_sin,
        _uniform(v[:, 21], 0.7, 1.2), _uniform(v[:, 22], 0.01, 0.04),
    ], dim=-1)
    return slots.float(), glob.float()


# -- pixel-level rendering: only exactly rounded operations below (see the module docstring) --

def _shape_mask(shape: int, u: torch.Tensor, v: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Inside test in the object's frame, where the nominal extent is [-1, 1] on both axes."""
    name = SHAPES[shape]
    if name == "ellipse":
        return u * u + v * v <= 1.0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= extra)
    au, av = u.abs(), v.abs()
    # Rectangles are trimmed and triangles enlarged so all shapes cover similar areas (2.4-3.1).
    if name == "rectangle":
        return (au <= 0.87) & (av <= 0.87)
    if name == "triangle":  # equilateral, circumradius 1.4, centroid at the origin
        return (v >= -0.7) & (v <= 1.4 - _SQRT3 * au)
    # cross: two bars of half-width `extra`
    return ((au <= 1.0) & (av <= extra)) | ((av <= 1.0) & (au <= extra))


def _texture_mask(texture: int, pu: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """Where the darker tone goes; coordinates are in texture periods."""
    name = TEXTURES[texture]
    fu, fv = pu.floor(), pv.floor()
    if name == "stripes":
        return pu - fu < 0.5
    if name == "checker":
        half = (fu + fv) * 0.5
        return half != half.floor()
    du, dv = pu - fu - 0.5, pv - fv - 0.5  # dots
    return du * du + dv * dv < _DOT_RADIUS2


def _column(table: torch.Tensor, index: int) -> torch.Tensor:
    """One per-row parameter, shaped [rows, 1, 1] to broadcast over pixel maps."""
    return table[:, index].view(-1, 1, 1)


def _frame(p: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated, unscaled coordinates [m, H, W] of every pixel around each slot's centre."""
    cos, sin = _column(p, _F["cos"]), _column(p, _F["sin"])
    dx, dy = xs - _column(p, _F["cx"]), ys - _column(p, _F["cy"])
    return dx * cos + dy * sin, dy * cos - dx * sin


def _slot_maps(slots: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inside and dark-tone masks [M, H, W] of the flat slot list [M, F].

    Slots are grouped by shape (then by texture) so each pixel map is evaluated only with its own
    shape function, and inactive slots cost nothing.
    """
    m, h, w = slots.shape[0], ys.shape[1], xs.shape[2]
    inside = torch.zeros(m, h, w, dtype=torch.bool)
    dark = torch.zeros(m, h, w, dtype=torch.bool)
    active = slots[:, _F["active"]] > 0
    for shape in range(len(SHAPES)):
        rows = (active & (slots[:, _F["shape"]] == shape)).nonzero().squeeze(1)
        if rows.numel():
            p = slots[rows]
            tu, tv = _frame(p, ys, xs)
            u, v = tu * _column(p, _F["inv_sx"]), tv * _column(p, _F["inv_sy"])
            inside[rows] = _shape_mask(shape, u, v, _column(p, _F["extra"]))
    for texture in range(1, len(TEXTURES)):  # 0 = flat: no dark tone
        rows = (active & (slots[:, _F["texture"]] == texture)).nonzero().squeeze(1)
        if rows.numel():
            p = slots[rows]
            tu, tv = _frame(p, ys, xs)
            inv = _column(p, _F["inv_period"])
            pu = tu * inv + _column(p, _F["phase_u"])
            pv = tv * inv + _column(p, _F["phase_v"])
            dark[rows] = _texture_mask(texture, pu, pv)
    return inside, dark


def _render(slots: torch.Tensor, glob: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [n, 3, H, W] and labels uint8 [n, H, W] from scene parameters and noise."""
    n, s = slots.shape[:2]
    h, w = noise.shape[-2:]
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).view(1, h, 1)
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / w).view(1, 1, w)

    def g(name: str) -> torch.Tensor:
        return _column(glob, _G[name])

    def triangle_wave(kx, ky, phase):
        z = xs * kx + ys * ky + phase
        return (z - z.floor() - 0.5).abs() - 0.25

    t = ((xs - 0.5) * g("grad_cos") + (ys - 0.5) * g("grad_sin") + 0.5).clamp(0.0, 1.0).unsqueeze(1)
    c1 = glob[:, _G["bg_r1"]:_G["bg_b1"] + 1].view(n, 3, 1, 1)
    c2 = glob[:, _G["bg_r2"]:_G["bg_b2"] + 1].view(n, 3, 1, 1)
    pattern = (g("pat1_amp") * triangle_wave(g("pat1_kx"), g("pat1_ky"), g("pat1_phase"))
               + g("pat2_amp") * triangle_wave(g("pat2_kx"), g("pat2_ky"), g("pat2_phase")))
    background = c1 + (c2 - c1) * t + pattern.unsqueeze(1)

    inside, dark = _slot_maps(slots.reshape(n * s, -1), ys, xs)
    inside, dark = inside.view(n, s, h, w), dark.view(n, s, h, w)
    # Painter's algorithm over the depth-sorted slots: remember who is on top of each pixel.
    top = torch.zeros(n, h, w, dtype=torch.long)  # 0 = background, k = slot k - 1
    top_dark = torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(s):
        top = torch.where(inside[:, k], k + 1, top)
        top_dark = torch.where(inside[:, k], dark[:, k], top_dark)

    base = torch.cat([torch.zeros(n, 1, 3), slots[:, :, _F["r"]:_F["b"] + 1]], dim=1)  # [n, s+1, 3]
    shade = torch.cat([torch.zeros(n, 1, 3), slots[:, :, _F["r2"]:_F["b2"] + 1]], dim=1)
    flat_top = (top + torch.arange(n).view(n, 1, 1) * (s + 1)).view(-1)
    colour = torch.where(top_dark.view(-1, 1), shade.view(-1, 3)[flat_top], base.view(-1, 3)[flat_top])
    colour = colour.view(n, h, w, 3).permute(0, 3, 1, 2)
    image = torch.where((top > 0).unsqueeze(1), colour, background)

    gain = g("gain") + (xs - 0.5) * g("gain_kx") + (ys - 0.5) * g("gain_ky")
    image = (image * gain.unsqueeze(1) - 0.5) * g("contrast").unsqueeze(1) + 0.5
    image = image + noise * g("noise").unsqueeze(1)
    image = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)

    labels = torch.cat([torch.zeros(n, 1), slots[:, :, _F["label"]]], dim=1).view(-1)[flat_top]
    return image, labels.view(n, h, w).to(torch.uint8)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if not (isinstance(height, int) and isinstance(width, int) and height >= 1 and width >= 1):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return height, width


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops single-threaded for a while.

    Rendering is thousands of mid-sized element-wise ops. Each is an OpenMP parallel region whose
    barrier spins whenever another process holds a core: on a busy 2-core machine 1200 images at
    96x96 took 180 s with two threads and 3 s with one. One thread costs ~1.5x on an idle machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def generate_scenes(
    seed: int,
    indices: range | Sequence[int],
    size: int | tuple[int, int],
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes ``indices`` of stream ``seed``: images uint8 [n, 3, H, W], labels uint8 [n, H, W].

    Labels are in ``0..NUM_CLASSES-1`` (never the ignore index). ``progress``, when given, is a
    name under which a counter is written to stderr.
    """
    height, width = _as_size(size)
    indices = list(indices)
    n = len(indices)
    images = torch.empty(n, 3, height, width, dtype=torch.uint8)
    labels = torch.empty(n, height, width, dtype=torch.uint8)
    # About 1M slot pixels per chunk: big enough to amortise op overhead, small enough for cache.
    chunk = max(1, (1 << 20) // (_NUM_SLOTS * height * width))
    with _one_thread():
        for start in range(0, n, chunk):
            part = indices[start:start + chunk]
            draws = [_draws(int(seed), int(index), height, width) for index in part]
            slots, globs = _scene_params(torch.stack([d[0] for d in draws]))
            noise = torch.stack([d[1] for d in draws])
            end = start + len(part)
            images[start:end], labels[start:end] = _render(slots, globs, noise)
            if progress:
                print(f"\rsynthetic {progress}: {end}/{n} images", end="\n" if end == n else "",
                      file=sys.stderr, flush=True)
    return images, labels


@dataclass
class SyntheticSegmentation:
    """One split held as two tensors (move them to the GPU once; nothing is generated lazily).

    Also the base of the other generated sets' splits (``FashionSegmentation``)."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # uint8 [N, H, W]
    split: str
    seed: int
    num_classes: int = NUM_CLASSES
    class_names: tuple[str, ...] = CLASS_NAMES
    ignore_index: int = IGNORE_INDEX
    cache_path: str | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str):
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))


def cache_file_name(split: str, num_images: int, size: int | tuple[int, int], seed: int) -> str:
    height, width = _as_size(size)
    return f"synthetic-v{GENERATOR_VERSION}-{split}-n{num_images}-{height}x{width}-seed{seed}.pt"


def _read_cache(path: str, num_images: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = data["images"], data["labels"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged cache is only a cache: regenerate it
        print(f"warning: ignoring unreadable cache file {path}: {exc}", file=sys.stderr)
        return None
    if (images.shape != (num_images, 3, height, width) or labels.shape != (num_images, height, width)
            or images.dtype != torch.uint8 or labels.dtype != torch.uint8):
        return None
    return images, labels


def cached_scenes(path: str | None, num_images: int, height: int, width: int, version: int,
                  generate: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes in cache file ``path`` when it holds ``num_images`` of ``height`` x ``width``, else
    ``generate()``, written to ``path`` atomically (``path`` None: no cache): images uint8
    [N, 3, H, W] and labels uint8 [N, H, W]."""
    cached = _read_cache(path, num_images, height, width) if path else None
    if cached is not None:
        return cached
    images, labels = generate()
    if path:
        atomic_save({"images": images, "labels": labels, "version": version}, path)
    return images, labels


def load_synthetic(
    split: str,
    num_images: int,
    size: int | tuple[int, int],
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = False,
) -> SyntheticSegmentation:
    """The ``split`` ("train" or "val") of the synthetic set: images ``SPLIT_OFFSETS[split] + 0..N-1``.

    With ``cache_dir`` the tensors are read from, or written (atomically) to, a file named after
    the split, size, count, seed and ``GENERATOR_VERSION``.
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    height, width = _as_size(size)
    path = os.path.join(cache_dir, cache_file_name(split, num_images, size, seed)) if cache_dir else None
    offset = SPLIT_OFFSETS[split]
    images, labels = cached_scenes(path, num_images, height, width, GENERATOR_VERSION, lambda: generate_scenes(
        seed, range(offset, offset + num_images), (height, width), progress=split if progress else None))
    return SyntheticSegmentation(images, labels, split, seed, cache_path=path)
