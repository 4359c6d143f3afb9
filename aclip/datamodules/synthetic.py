"""Built-in, procedurally generated image-caption data: no files, deterministic by seed.

Each image shows one or two captioned objects, a saturated colour times a shape ("red circle", 24
classes), on a mid-dark textured background among desaturated clutter. It is built so that token
removal matters for a tiny CLIP trained on a CPU in minutes: each object covers only a minority of the
image (about 6-25% of the area), so which patches a policy keeps decides whether the model sees the
object at all. Clutter is never saturated, so it can never be mistaken for a class object, but it fills
the image with busy patches that carry no caption information.

Sample ``i`` is a pure function of ``(seed, split, i)`` (and of which dataset class draws it): every
random draw comes from ``numpy.random.default_rng([seed, split_index, kind, i, stream])``, so images are
byte-identical whatever the worker or access order, and the splits "train", "val" and "test" are
independent streams.

Three variants share the scene sampling, rendering and captioning (``variant``): "shapes" (the above),
"glyphs" (letters and digits in any hue among the same clutter, captions naming the glyphs) and
"segments" (seven-segment digits in thin strokes on a noisy, high-frequency ground among loose grey
strokes of the same widths: an object's identity needs most of its patches, as in small real data).

Each variant comes as three datasets:

* :class:`SyntheticCaptions`: ``(image, caption)`` training pairs.
* :class:`SyntheticClassification`: zero-shot classification, one object per image, balanced labels.
* :class:`SyntheticRetrieval`: image-text retrieval, several different captions per image.
"""

from __future__ import annotations

import colorsys
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.data import Dataset

from aclip.datamodules import raster

__all__ = [
    "CLASSNAMES",
    "COLOURS",
    "PROMPT_TEMPLATES",
    "SHAPES",
    "SyntheticCaptions",
    "SyntheticClassification",
    "SyntheticRetrieval",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 40),
    "blue": (30, 80, 240),
    "yellow": (245, 225, 20),
    "magenta": (225, 30, 225),
    "cyan": (20, 215, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CLASSNAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {} among clutter.",
    "there is a {} in the picture.",
    "a small {} on a noisy background.",
    "an image showing a {}.",
    "a picture of a {}.",
    "a cluttered scene with a {}.",
)

# (sentence, object phrase): the sentence takes the joined object phrases as {objs} and "is"/"are" as
# {be}; each phrase gets its own article. The wording matches PROMPT_TEMPLATES where it can, so the
# zero-shot prompts are in-distribution text.
_CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a photo of {objs}.", "{colour} {shape}"),
    ("{objs} among clutter.", "{colour} {shape}"),
    ("there {be} {objs} in the picture.", "{colour} {shape}"),
    ("{objs} on a noisy background.", "small {colour} {shape}"),
    ("an image showing {objs}.", "{colour} {shape}"),
    ("a picture of {objs}.", "{colour} {shape}"),
    ("a cluttered scene with {objs}.", "{colour} {shape}"),
    ("{objs}.", "{shape} coloured {colour}"),
)

_SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
# Dataset kinds and per-sample random streams: entries of each sample's seed sequence.
_KIND_CAPTIONS, _KIND_CLASSIFICATION, _KIND_RETRIEVAL = 0, 1, 2
_STREAM_SCENE, _STREAM_CAPTION, _STREAM_RENDER = 0, 1, 2

_OBJECT_SIDE = (0.30, 0.50)  # fraction of the image side
# Per-shape size factors so the four shapes cover comparable areas (a triangle fills half its box).
_SHAPE_SCALE: dict[str, float] = {"circle": 1.0, "square": 1.0, "triangle": 1.2, "cross": 1.15}
_MAX_ROTATION = 25.0  # degrees; shapes stay upright enough to tell a square from a diamond
_PLACEMENT_TRIES = 12
_MAX_OVERLAP = 0.15  # of the smaller object's bounding box
_P_SINGLE_OBJECT = 0.6
_N_CLUTTER = (4, 10)
_CLUTTER_SIZE = (0.08, 0.22)  # fraction of the image side: always smaller in area than an object
_CLUTTER_MAX_SATURATION = 0.22  # class colours have saturation > 0.85
_CLUTTER_VALUE = (0.15, 0.85)
_BACKGROUND_HUE = (0.05, 0.12)  # with low saturation: greys to browns
_BACKGROUND_MAX_SATURATION = 0.3
_BACKGROUND_VALUE = (0.22, 0.42)  # mid-dark, so both dark and bright clutter stand out
_NOISE = 8  # per-pixel noise, uniform in [-_NOISE, _NOISE]
_TEXTURE_STD = 12.0  # low-frequency brightness variation
_TEXTURE_GRID = 5

_ARM = 0.18  # half-thickness of a cross arm, in units of its side
_Point = tuple[float, float]
_UNIT_POLYGONS: dict[str, tuple[_Point, ...]] = {
    "square": ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "triangle": ((0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "cross": (
        (-_ARM, -0.5), (_ARM, -0.5), (_ARM, -_ARM), (0.5, -_ARM), (0.5, _ARM), (_ARM, _ARM),
        (_ARM, 0.5), (-_ARM, 0.5), (-_ARM, _ARM), (-0.5, _ARM), (-0.5, -_ARM), (-_ARM, -_ARM),
    ),
}  # fmt: skip
# The cross's two bars, convex, as indices of its polygon's vertices.
_CROSS_BARS = ((0, 1, 6, 7), (10, 3, 4, 9))

_Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
_RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Object:
    """A captioned object, in pixels of the output image; it lies fully inside the image."""

    colour: str
    shape: str
    box: _Box  # for a circle, its bounding square
    polygon: tuple[_Point, ...] | None  # None for a circle

    @property
    def label(self) -> int:
        return CLASSNAMES.index(f"{self.colour} {self.shape}")

    @property
    def rgb(self) -> _RGB:
        return COLOURS[self.colour]

    @property
    def phrases(self) -> dict[str, str]:
        """The words a caption template names the object with."""
        return {"colour": self.colour, "shape": self.shape}

    def coverage(self, size: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
        return _object_coverage(self, size)


@dataclass(frozen=True)
class _Clutter:
    """A distractor: "ellipse" (points = two box corners), "polygon" or "line" (a polyline)."""

    kind: str
    points: tuple[_Point, ...]
    colour: _RGB
    width: float = 0.0  # line width in output pixels
    centre: _Point = (0.0, 0.0)  # a blob's centre


@dataclass(frozen=True)
class _Ground:
    """A variant's background: per-pixel noise, uniform in [-noise, noise], over a brightness texture of
    standard deviation `texture_std` interpolated from a `texture_grid` x `texture_grid` grid (the finer
    the grid, the higher its frequencies)."""

    noise: int = _NOISE
    texture_std: float = _TEXTURE_STD
    texture_grid: int = _TEXTURE_GRID


@dataclass(frozen=True)
class _Scene:
    objects: tuple[_Object | _Glyph | _SegmentDigit, ...]
    clutter: tuple[_Clutter, ...]
    background: _RGB
    ground: _Ground = _Ground()


# Geometry is plain Python: with at most 12 vertices, numpy's per-call overhead would dominate.
def _place(
    unit: Sequence[_Point], centre: _Point, size: float, angle: float, aspect: float = 1.0
) -> tuple[_Point, ...]:
    """Scale ``unit`` by ``size`` (y also by ``aspect``), rotate by ``angle`` degrees, move to ``centre``."""
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    cx, cy = centre
    return tuple(
        (cx + size * (x * cos + aspect * y * sin), cy + size * (aspect * y * cos - x * sin)) for x, y in unit
    )


def _bounds(points: Sequence[_Point]) -> _Box:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return (min(xs), min(ys), max(xs), max(ys))


def _hsv(hue: float, saturation: float, value: float) -> _RGB:
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def _lerp(u: float, bounds: tuple[float, float]) -> float:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _overlap(a: _Box, b: _Box) -> float:
    """Intersection area over the area of the smaller box."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def _sample_object(rng: np.random.Generator, image_size: int, label: int) -> _Object:
    colour, shape = CLASSNAMES[label].split(" ")
    u_side, u_angle, u_x, u_y = rng.random(4).tolist()
    side = _lerp(u_side, _OBJECT_SIDE) * image_size * _SHAPE_SCALE[shape]
    if shape == "circle":
        polygon = None
        x0, y0, x1, y1 = -side / 2, -side / 2, side / 2, side / 2
    else:
        polygon = _place(
            _UNIT_POLYGONS[shape], (0.0, 0.0), side, _lerp(u_angle, (-_MAX_ROTATION, _MAX_ROTATION))
        )
        x0, y0, x1, y1 = _bounds(polygon)
    # Shift so that the whole object lies inside the image.
    dx = -x0 + u_x * max(image_size - (x1 - x0), 0.0)
    dy = -y0 + u_y * max(image_size - (y1 - y0), 0.0)
    if polygon is not None:
        polygon = tuple((x + dx, y + dy) for x, y in polygon)
    return _Object(colour, shape, (x0 + dx, y0 + dy, x1 + dx, y1 + dy), polygon)


def _sample_clutter(rng: np.random.Generator, image_size: int) -> _Clutter:
    u_hue, u_sat, u_val, u_size, u_x, u_y, u_kind, u_a, u_b = rng.random(9).tolist()
    colour = _hsv(u_hue, u_sat * _CLUTTER_MAX_SATURATION, _lerp(u_val, _CLUTTER_VALUE))
    size = _lerp(u_size, _CLUTTER_SIZE) * image_size
    cx, cy = u_x * image_size, u_y * image_size
    kind = ("ellipse", "rect", "line", "blob")[int(u_kind * 4)]
    if kind == "ellipse":
        rx, ry = size / 2, size / 2 * _lerp(u_a, (0.4, 1.0))
        return _Clutter("ellipse", ((cx - rx, cy - ry), (cx + rx, cy + ry)), colour)
    if kind == "rect":
        vertices = _place(_UNIT_POLYGONS["square"], (cx, cy), size, u_a * 180, aspect=_lerp(u_b, (0.3, 1.0)))
        return _Clutter("polygon", vertices, colour)
    if kind == "line":
        points = [(cx, cy)]
        for _ in range(1 + int(u_a * 2)):  # 2 or 3 points
            step_x, step_y = rng.normal(0.0, size / 2, size=2).tolist()
            points.append((points[-1][0] + step_x, points[-1][1] + step_y))
        return _Clutter("line", tuple(points), colour, width=_lerp(u_b, (1.0, 2.5)))
    # A star-shaped blob: random radii at sorted angles.
    n_points = 5 + int(u_a * 4)
    angles = sorted(rng.random(n_points).tolist())
    radii = rng.random(n_points).tolist()
    vertices = tuple(
        (
            cx + size / 2 * _lerp(r, (0.4, 1.0)) * math.cos(2 * math.pi * a),
            cy + size / 2 * _lerp(r, (0.4, 1.0)) * math.sin(2 * math.pi * a),
        )
        for a, r in zip(angles, radii, strict=True)
    )
    return _Clutter("polygon", vertices, colour, centre=(cx, cy))


def _sample_scene(
    rng: np.random.Generator,
    image_size: int,
    n_objects: int,
    classes: Sequence[int] | None = None,
    variant: str = "shapes",
) -> _Scene:
    """Sample a scene with ``n_objects`` objects of distinct classes (``classes`` if given) of the
    `variant` (a key of `VARIANTS`: "shapes", coloured shapes; "glyphs", letters and digits; "segments",
    seven-segment digits in thin strokes)."""
    spec = VARIANTS[variant]
    u_hue, u_sat, u_val, u_clutter = rng.random(4).tolist()
    background = _hsv(
        _lerp(u_hue, _BACKGROUND_HUE), u_sat * _BACKGROUND_MAX_SATURATION, _lerp(u_val, _BACKGROUND_VALUE)
    )
    n_clutter = spec.n_clutter[0] + int(u_clutter * (spec.n_clutter[1] - spec.n_clutter[0] + 1))
    clutter = tuple(spec.sample_clutter(rng, image_size) for _ in range(n_clutter))
    if classes is None:
        classes = rng.choice(len(spec.classnames), size=n_objects, replace=False).tolist()
    if len(classes) != n_objects:
        raise ValueError(f"got {len(classes)} classes for {n_objects} objects")
    objects: list[_Object | _Glyph | _SegmentDigit] = []
    for label in classes:
        # Keep objects mostly separate: retry placement, falling back to the least overlapping one.
        best: tuple[float, _Object] | None = None
        for _ in range(_PLACEMENT_TRIES):
            candidate = spec.sample_object(rng, image_size, int(label))
            overlap = max((_overlap(candidate.box, other.box) for other in objects), default=0.0)
            if best is None or overlap < best[0]:
                best = (overlap, candidate)
            if overlap <= _MAX_OVERLAP:
                break
        assert best is not None
        objects.append(best[1])
    return _Scene(objects=tuple(objects), clutter=clutter, background=background, ground=spec.ground)


def _num_objects(rng: np.random.Generator, max_objects: int) -> int:
    if max_objects == 1 or rng.random() < _P_SINGLE_OBJECT:
        return 1
    return 2


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int, amplitude: int) -> np.ndarray:
    """Per-pixel noise, uniform in [-amplitude, amplitude], on a [3, 2 * size, 2 * size] tile that every
    image of that size cuts its noise from at an offset of its own (drawing fresh noise per image would be
    the renderer's largest cost)."""
    rng = np.random.default_rng([amplitude, size])
    return rng.integers(-amplitude, amplitude + 1, size=(3, 2 * size, 2 * size)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _bilinear_upsampling(size: int, grid: int) -> np.ndarray:
    """The [size, grid] matrix of bilinear interpolation weights from the texture grid's cell centres to
    the pixel centres (clamped at the borders, as `F.interpolate(align_corners=False)`)."""
    position = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0, grid - 1)
    low = np.minimum(np.floor(position).astype(int), grid - 2)
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), low] = 1 - (position - low)
    weights[np.arange(size), low + 1] = position - low
    return weights


def _background(base: _RGB, size: int, rng: np.random.Generator, ground: _Ground) -> np.ndarray:
    """The background [3, size, size] float32: a base colour, a brightness texture and per-pixel noise."""
    grid = ground.texture_grid
    coarse = rng.normal(0.0, ground.texture_std, size=(grid, grid)).astype(np.float32)
    upsample = _bilinear_upsampling(size, grid)
    texture = upsample @ coarse @ upsample.T  # bilinear interpolation of the coarse grid
    top, left = rng.integers(0, size, size=2)
    canvas = _noise_bank(size, ground.noise)[:, top : top + size, left : left + size] + texture
    canvas += np.asarray(base, dtype=np.float32)[:, None, None]
    return canvas


def _paint_clutter(canvas: np.ndarray, item: _Clutter) -> None:
    size = canvas.shape[-1]
    colour = np.asarray(item.colour, dtype=np.float32)
    if item.kind == "line":
        bounds = _bounds(item.points)
        found = raster.region(bounds, size, margin=item.width)
        if found is not None:
            where, xs, ys = found
            raster.paint(canvas, where, raster.polyline(xs, ys, item.points, item.width), colour)
        return
    found = raster.region(_bounds(item.points), size)
    if found is None:
        return
    where, xs, ys = found
    if item.kind == "ellipse":
        (x0, y0), (x1, y1) = item.points
        coverage = raster.ellipse(xs, ys, ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0) / 2, (y1 - y0) / 2)
    elif item.kind == "polygon" and len(item.points) == 4:
        coverage = raster.convex_polygon(xs, ys, item.points)
    else:  # a star-shaped blob around its centre
        centre = item.centre
        angles = [math.atan2(y - centre[1], x - centre[0]) / (2 * math.pi) % 1.0 for x, y in item.points]
        radii = [math.hypot(x - centre[0], y - centre[1]) for x, y in item.points]
        order = np.argsort(angles)
        coverage = raster.star(xs, ys, centre, np.asarray(angles)[order], np.asarray(radii)[order])
    raster.paint(canvas, where, coverage, colour)


def _object_coverage(obj: _Object, size: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The pixels a captioned shape covers, and how much."""
    found = raster.region(obj.box, size)
    if found is None:
        return None
    where, xs, ys = found
    if obj.polygon is None:
        x0, y0, x1, y1 = obj.box
        coverage = raster.disc(xs, ys, ((x0 + x1) / 2, (y0 + y1) / 2), (x1 - x0) / 2)
    elif obj.shape == "cross":  # the union of its two bars, each convex
        bars = [[obj.polygon[i] for i in indices] for indices in _CROSS_BARS]
        coverage = np.maximum(*(raster.convex_polygon(xs, ys, bar) for bar in bars))
    else:
        coverage = raster.convex_polygon(xs, ys, obj.polygon)
    return where, coverage


def _draw(scene: _Scene, image_size: int, rng: np.random.Generator, channels: int) -> np.ndarray:
    """Draw ``scene`` into an [H, W, channels] uint8 array: RGB, then (channels 4) the objects' coverage
    (255: fully the captioned objects'). ``rng`` only drives the background texture and noise.

    Channels last, as decoded images are stored: the views resize faster from it."""
    canvas = _background(scene.background, image_size, rng, scene.ground)
    for item in scene.clutter:
        _paint_clutter(canvas, item)
    objects = np.zeros((image_size, image_size), dtype=np.float32)
    for obj in scene.objects:  # after the clutter, so objects are on top
        covered = obj.coverage(image_size)
        if covered is None:
            continue
        where, coverage = covered
        raster.paint(canvas, where, coverage, np.asarray(obj.rgb, dtype=np.float32))
        np.maximum(objects[where], coverage, out=objects[where])
    np.clip(np.rint(canvas, out=canvas), 0, 255, out=canvas)
    layers = np.empty((image_size, image_size, channels), dtype=np.uint8)
    layers[..., :3] = canvas.transpose(1, 2, 0)
    if channels == 4:
        layers[..., 3] = np.rint(objects * 255)
    return layers


def _render(scene: _Scene, image_size: int, rng: np.random.Generator) -> Tensor:
    """Draw ``scene`` as uint8 RGB pixels [3, size, size]; ``rng`` only drives the background texture
    and noise."""
    return torch.from_numpy(_draw(scene, image_size, rng, 3)).permute(2, 0, 1)


def _render_with_mask(scene: _Scene, image_size: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``scene``: its pixels [3, size, size] uint8 and its objects' coverage [size, size] uint8
    (255: fully the captioned objects'), the channels of one [H, W, 4] buffer, which
    `MultiViewTransform` cuts and resizes in one pass per crop."""
    channels = torch.from_numpy(_draw(scene, image_size, rng, 4)).permute(2, 0, 1)
    return channels[:3], channels[3]


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _caption(objects: Sequence[_Object | _Glyph | _SegmentDigit], template: tuple[str, str]) -> str:
    """Caption ``objects`` (in this order) with one of their variant's caption templates."""
    sentence, phrase = template
    phrases = [phrase.format(**obj.phrases) for obj in objects]
    joined = " and ".join(f"{_article(p)} {p}" for p in phrases)
    return sentence.format(objs=joined, be="is" if len(objects) == 1 else "are")


def _sample_captions(scene: _Scene, rng: np.random.Generator, k: int, variant: str = "shapes") -> list[str]:
    """``k`` captions of ``scene`` with distinct templates, each listing the objects in random order."""
    caption_templates = VARIANTS[variant].caption_templates
    templates = rng.choice(len(caption_templates), size=k, replace=False)
    captions = []
    for template in templates.tolist():
        order = rng.permutation(len(scene.objects)).tolist()
        captions.append(_caption([scene.objects[j] for j in order], caption_templates[template]))
    return captions


# -- The harder variant: letters and digits, small, among the same clutter --------------------------------

GLYPHS: str = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O, which read as 1 and 0
GLYPH_CLASSNAMES: tuple[str, ...] = tuple(
    f"digit {glyph}" if glyph.isdigit() else f"letter {glyph}" for glyph in GLYPHS
)
GLYPH_PROMPT_TEMPLATES: tuple[str, ...] = PROMPT_TEMPLATES
_GLYPH_CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a photo of {objs}.", "{name}"),
    ("{objs} among clutter.", "{name}"),
    ("there {be} {objs} in the picture.", "{name}"),
    ("{objs} on a noisy background.", "small {name}"),
    ("an image showing {objs}.", "{name}"),
    ("a picture of {objs}.", "{name}"),
    ("a cluttered scene with {objs}.", "{name}"),
    ("{objs} written in colour.", "{name}"),
)
_GLYPH_HEIGHT = (0.26, 0.38)  # font size, as a fraction of the image side
_GLYPH_ROTATION = 15.0  # degrees
_GLYPH_SATURATION = (0.85, 1.0)  # saturated like the shapes, in any hue; captions never name it
_GLYPH_VALUE = (0.8, 1.0)


@functools.lru_cache(maxsize=64)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `pixels` (no font file needed)."""
    return ImageFont.load_default(size=pixels)


@functools.lru_cache(maxsize=2048)
def _upright_glyph(glyph: str, pixels: int) -> Image.Image:
    """`glyph` drawn at font size `pixels` (255 on 0), with room to rotate it."""
    font = _font(pixels)
    left, top, right, bottom = font.getbbox(glyph)
    pad = pixels // 2
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), glyph, fill=255, font=font)
    return canvas


@functools.lru_cache(maxsize=256)
def _glyph_mask(glyph: str, pixels: int, angle: int) -> np.ndarray:
    """The coverage [h, w] float32 of `glyph` at font size `pixels`, rotated by `angle` degrees, cropped."""
    rotated = _upright_glyph(glyph, pixels).rotate(angle, resample=Image.Resampling.BICUBIC)
    mask = np.asarray(rotated, dtype=np.float32) / 255
    rows, cols = np.nonzero(mask > 0)
    return np.ascontiguousarray(mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])


@dataclass(frozen=True)
class _Glyph:
    """A captioned letter or digit, in pixels of the output image; it lies fully inside the image."""

    glyph: str
    rgb: _RGB
    box: _Box  # the top-left corner of its mask, and the corner plus the mask's size
    pixels: int  # font size
    angle: int  # degrees

    @property
    def label(self) -> int:
        return GLYPHS.index(self.glyph)

    @property
    def phrases(self) -> dict[str, str]:
        return {"name": GLYPH_CLASSNAMES[self.label]}

    def coverage(self, size: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
        mask = _glyph_mask(self.glyph, self.pixels, self.angle)
        top, left = int(self.box[1]), int(self.box[0])
        bottom, right = min(size, top + mask.shape[0]), min(size, left + mask.shape[1])
        return (slice(top, bottom), slice(left, right)), mask[: bottom - top, : right - left]


def _sample_glyph(rng: np.random.Generator, image_size: int, label: int) -> _Glyph:
    u_size, u_angle, u_hue, u_sat, u_val, u_x, u_y = rng.random(7).tolist()
    pixels = max(6, round(_lerp(u_size, _GLYPH_HEIGHT) * image_size))
    angle = round(_lerp(u_angle, (-_GLYPH_ROTATION, _GLYPH_ROTATION)))
    height, width = _glyph_mask(GLYPHS[label], pixels, angle).shape
    left, top = round(u_x * max(image_size - width, 0)), round(u_y * max(image_size - height, 0))
    colour = _hsv(u_hue, _lerp(u_sat, _GLYPH_SATURATION), _lerp(u_val, _GLYPH_VALUE))
    return _Glyph(GLYPHS[label], colour, (left, top, left + width, top + height), pixels, angle)


# -- The variant hard the way small real data is: thin-stroke digits on a noisy ground among strokes -------

# Seven-segment digits: an object's identity is the arrangement of its strokes, and most digits differ
# from another in one or two segments (8 from 0, 6 and 9; 7 from 1; 3 from 9), so a view that drops a
# few of its patches often cannot tell which digit it is. The clutter is loose strokes of the same widths
# and brightness, desaturated as all clutter: a stroke's colour marks a digit, but which digit it is
# needs the arrangement of its strokes.
SEGMENT_DIGITS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
SEGMENT_CLASSNAMES: tuple[str, ...] = tuple(f"digit {name}" for name in SEGMENT_DIGITS)
SEGMENT_PROMPT_TEMPLATES: tuple[str, ...] = PROMPT_TEMPLATES
_SEGMENT_CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    *_GLYPH_CAPTION_TEMPLATES[:7],
    ("{objs} drawn in thin strokes.", "{name}"),
)
# The segments a..g as pairs of frame corners, in units of the digit's width (x) and height (y) around
# its centre: a top, b upper right, c lower right, d bottom, e lower left, f upper left, g middle.
_SEGMENT_ENDS: tuple[tuple[_Point, _Point], ...] = (
    ((-0.5, -0.5), (0.5, -0.5)),
    ((0.5, -0.5), (0.5, 0.0)),
    ((0.5, 0.0), (0.5, 0.5)),
    ((-0.5, 0.5), (0.5, 0.5)),
    ((-0.5, 0.0), (-0.5, 0.5)),
    ((-0.5, -0.5), (-0.5, 0.0)),
    ((-0.5, 0.0), (0.5, 0.0)),
)
# The lit segments of each digit, as a seven-segment display draws them.
SEGMENTS_LIT: tuple[str, ...] = (
    "abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg",
)  # fmt: skip
_SEGMENT_HEIGHT = (0.38, 0.50)  # the digit's height, as a fraction of the image side
_SEGMENT_ASPECT = (0.50, 0.62)  # width over height
_SEGMENT_GAP = 0.12  # of a segment's length, left out at each end: every segment is a stroke of its own
_SEGMENT_SLANT = 0.15  # the largest italic shear, x shift per unit of height
_SEGMENT_ROTATION = 10.0  # degrees
_STROKE_WIDTH = (0.022, 0.036)  # of the image side: 1.4 to 2.3 px at 64 px
_STROKE_SATURATION = (0.4, 1.0)  # a digit's, in any hue (the clutter's: below _CLUTTER_MAX_SATURATION)
_STROKE_VALUE = (0.7, 1.0)  # digits and clutter strokes alike
_STROKE_LENGTH = (0.08, 0.22)  # a clutter stroke, as a fraction of the image side (a segment: ~0.1-0.2)
_SEGMENT_CLUTTER = (8, 16)
_SEGMENT_GROUND = _Ground(noise=24, texture_std=16.0, texture_grid=16)  # noise and 4 px texture at 64 px


@dataclass(frozen=True)
class _SegmentDigit:
    """A captioned seven-segment digit, in pixels of the output image; it lies fully inside the image."""

    digit: int
    rgb: _RGB
    segments: tuple[tuple[_Point, _Point], ...]  # all seven positions a..g, lit or not
    width: float  # stroke width in pixels
    box: _Box  # the frame's bounds, strokes included

    @property
    def label(self) -> int:
        return self.digit

    @property
    def lit(self) -> tuple[tuple[_Point, _Point], ...]:
        """The segments the digit draws."""
        return tuple(self.segments["abcdefg".index(name)] for name in SEGMENTS_LIT[self.digit])

    @property
    def phrases(self) -> dict[str, str]:
        return {"name": SEGMENT_CLASSNAMES[self.digit]}

    def coverage(self, size: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
        found = raster.region(self.box, size, margin=0.0)
        if found is None:
            return None
        where, xs, ys = found
        starts, ends = np.asarray(self.lit, dtype=np.float32).transpose(1, 0, 2)  # [lit, 2] each
        return where, raster.strokes(xs, ys, starts, ends, self.width)


def _sample_segment_digit(rng: np.random.Generator, image_size: int, label: int) -> _SegmentDigit:
    u_height, u_aspect, u_width, u_slant, u_angle, u_hue, u_sat, u_val, u_x, u_y = rng.random(10).tolist()
    height = _lerp(u_height, _SEGMENT_HEIGHT) * image_size
    aspect = 1 / _lerp(u_aspect, _SEGMENT_ASPECT)  # `_place` scales y by it, x by the width
    slant = _lerp(u_slant, (-_SEGMENT_SLANT, _SEGMENT_SLANT)) * aspect
    angle = _lerp(u_angle, (-_SEGMENT_ROTATION, _SEGMENT_ROTATION))
    ends = []
    for (x0, y0), (x1, y1) in _SEGMENT_ENDS:
        inset_x, inset_y = _SEGMENT_GAP * (x1 - x0), _SEGMENT_GAP * (y1 - y0)
        ends += [(x0 + inset_x - slant * y0, y0 + inset_y), (x1 - inset_x - slant * y1, y1 - inset_y)]
    points = _place(ends, (0.0, 0.0), height / aspect, angle, aspect)
    width = _lerp(u_width, _STROKE_WIDTH) * image_size
    x0, y0, x1, y1 = _bounds(points)
    x0, y0, x1, y1 = x0 - width / 2, y0 - width / 2, x1 + width / 2, y1 + width / 2
    dx = -x0 + u_x * max(image_size - (x1 - x0), 0.0)
    dy = -y0 + u_y * max(image_size - (y1 - y0), 0.0)
    moved = [(x + dx, y + dy) for x, y in points]
    return _SegmentDigit(
        digit=label,
        rgb=_hsv(u_hue, _lerp(u_sat, _STROKE_SATURATION), _lerp(u_val, _STROKE_VALUE)),
        segments=tuple(zip(moved[::2], moved[1::2], strict=True)),
        width=width,
        box=(x0 + dx, y0 + dy, x1 + dx, y1 + dy),
    )


def _sample_stroke(rng: np.random.Generator, image_size: int) -> _Clutter:
    """A loose stroke, straight, with the digits' widths and brightness, desaturated as all clutter."""
    u_hue, u_sat, u_val, u_length, u_angle, u_width, u_x, u_y = rng.random(8).tolist()
    length = _lerp(u_length, _STROKE_LENGTH) * image_size
    dx, dy = length / 2 * math.cos(math.pi * u_angle), length / 2 * math.sin(math.pi * u_angle)
    cx, cy = u_x * image_size, u_y * image_size
    return _Clutter(
        "line",
        ((cx - dx, cy - dy), (cx + dx, cy + dy)),
        _hsv(u_hue, u_sat * _CLUTTER_MAX_SATURATION, _lerp(u_val, _STROKE_VALUE)),
        width=_lerp(u_width, _STROKE_WIDTH) * image_size,
    )


@dataclass(frozen=True)
class _Variant:
    """What a variant's scenes hold: its classes, prompts and captions, how it draws an object, and its
    ground: the background and the clutter (how many items, each drawn by `sample_clutter`)."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    caption_templates: tuple[tuple[str, str], ...]
    sample_object: Callable[[np.random.Generator, int, int], _Object | _Glyph | _SegmentDigit]
    sample_clutter: Callable[[np.random.Generator, int], _Clutter] = _sample_clutter
    n_clutter: tuple[int, int] = _N_CLUTTER
    ground: _Ground = _Ground()


VARIANTS: dict[str, _Variant] = {
    "shapes": _Variant(CLASSNAMES, PROMPT_TEMPLATES, _CAPTION_TEMPLATES, _sample_object),
    "glyphs": _Variant(GLYPH_CLASSNAMES, GLYPH_PROMPT_TEMPLATES, _GLYPH_CAPTION_TEMPLATES, _sample_glyph),
    "segments": _Variant(
        SEGMENT_CLASSNAMES,
        SEGMENT_PROMPT_TEMPLATES,
        _SEGMENT_CAPTION_TEMPLATES,
        _sample_segment_digit,
        sample_clutter=_sample_stroke,
        n_clutter=_SEGMENT_CLUTTER,
        ground=_SEGMENT_GROUND,
    ),
}


def _check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return variant


class _SyntheticBase(Dataset):
    """Argument checks and per-sample random streams shared by the three datasets."""

    _kind: int

    def __init__(self, size: int, image_size: int, seed: int, split: str, variant: str = "shapes") -> None:
        self.size = _check_int("size", size, 1)
        self.image_size = _check_int("image_size", image_size, 16)
        self.seed = _check_int("seed", seed, 0)
        if not isinstance(split, str) or split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.split = split
        self.variant = _check_variant(variant)

    def __len__(self) -> int:
        return self.size

    def _index(self, index: int) -> int:
        index = operator.index(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of size {self.size}")
        return index

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        # The shapes keep the streams they always had; other variants get streams of their own.
        variant = list(VARIANTS).index(self.variant)
        entropy = [self.seed, _SPLITS[self.split], self._kind, index, stream] + ([variant] if variant else [])
        return np.random.default_rng(entropy)

    def _scene(
        self, index: int, n_objects: int | None = None, classes: Sequence[int] | None = None
    ) -> _Scene:
        rng = self._rng(index, _STREAM_SCENE)
        n_objects = n_objects if n_objects is not None else _num_objects(rng, self.max_objects)
        return _sample_scene(rng, self.image_size, n_objects, classes, self.variant)

    # Every dataset draws sample `index` with its render stream, with or without the objects' coverage.
    def _render(self, scene: _Scene, index: int) -> Tensor:
        return _render(scene, self.image_size, self._rng(index, _STREAM_RENDER))

    def _render_with_mask(self, scene: _Scene, index: int) -> tuple[Tensor, Tensor]:
        return _render_with_mask(scene, self.image_size, self._rng(index, _STREAM_RENDER))


class SyntheticCaptions(_SyntheticBase):
    """Training pairs: (uint8 pixels [3, S, S], caption), with `object_masks` also a third item
    `{"object_mask": [S, S] uint8}`: how much of each pixel the captioned objects cover (255: all)."""

    _kind = _KIND_CAPTIONS

    def __init__(
        self,
        size: int = 20000,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 2,
        variant: str = "shapes",
        object_masks: bool = False,
    ) -> None:
        super().__init__(size, image_size, seed, split, variant)
        self.max_objects = _check_int("max_objects", max_objects, 1, 2)
        self.object_masks = bool(object_masks)

    def __getitem__(self, index: int) -> tuple[Tensor, str] | tuple[Tensor, str, dict[str, Tensor]]:
        index = self._index(index)
        scene = self._scene(index)
        (caption,) = _sample_captions(scene, self._rng(index, _STREAM_CAPTION), 1, self.variant)
        if not self.object_masks:
            return self._render(scene, index), caption
        pixels, objects = self._render_with_mask(scene, index)
        return pixels, caption, {"object_mask": objects}


class SyntheticClassification(_SyntheticBase):
    """Held-out zero-shot classification: one object per image, label = its class index (balanced).

    `classnames` and `templates` are the variant's (shapes: `CLASSNAMES`, glyphs: `GLYPH_CLASSNAMES`).
    `clutter=False` draws the same scenes without their clutter shapes (same objects, background and
    noise), to tell what a model has learned about the objects from what it has learned to ignore.
    """

    _kind = _KIND_CLASSIFICATION

    def __init__(
        self,
        size: int = 960,
        image_size: int = 64,
        seed: int = 0,
        split: str = "test",
        variant: str = "shapes",
        clutter: bool = True,
    ) -> None:
        super().__init__(size, image_size, seed, split, variant)
        self.clutter = bool(clutter)
        self.classnames: tuple[str, ...] = VARIANTS[self.variant].classnames
        self.templates: tuple[str, ...] = VARIANTS[self.variant].templates

    def label(self, index: int) -> int:
        """The label of sample ``index`` without rendering it."""
        return self._index(index) % len(self.classnames)

    def objects(self, index: int) -> tuple[_Object | _Glyph | _SegmentDigit, ...]:
        """The captioned object of sample ``index`` as drawn (its geometry, for analyses), in a 1-tuple."""
        return self._labelled_scene(self._index(index)).objects

    def _labelled_scene(self, index: int) -> _Scene:
        scene = self._scene(index, 1, classes=(self.label(index),))
        return scene if self.clutter else replace(scene, clutter=())

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        index = self._index(index)
        return self._render(self._labelled_scene(index), index), self.label(index)


class SyntheticRetrieval(_SyntheticBase):
    """Held-out image-text retrieval: each image has ``captions_per_image`` different captions."""

    _kind = _KIND_RETRIEVAL

    def __init__(
        self,
        size: int = 256,
        image_size: int = 64,
        seed: int = 0,
        split: str = "test",
        captions_per_image: int = 2,
        max_objects: int = 2,
        variant: str = "shapes",
    ) -> None:
        super().__init__(size, image_size, seed, split, variant)
        self.captions_per_image = _check_int(
            "captions_per_image", captions_per_image, 1, len(VARIANTS[self.variant].caption_templates)
        )
        self.max_objects = _check_int("max_objects", max_objects, 1, 2)
        # Scenes are cheap to sample and tiny; keeping them makes captions and images agree by construction.
        self._scenes: list[_Scene] = [self._scene(index) for index in range(self.size)]
        self.captions: list[list[str]] = [
            _sample_captions(scene, self._rng(index, _STREAM_CAPTION), self.captions_per_image, self.variant)
            for index, scene in enumerate(self._scenes)
        ]

    def __getitem__(self, index: int) -> Tensor:
        index = self._index(index)
        return self._render(self._scenes[index], index)
