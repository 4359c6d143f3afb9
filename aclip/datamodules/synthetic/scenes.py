"""Scene sampling: each variant's objects, clutter and ground drawn at random (`VARIANTS`), and a scene
of objects of distinct classes placed mostly apart (`sample_scene`). Plain data, no pixels: the
renderer draws a scene, the captions name its objects."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from aclip.datamodules.synthetic.captions import (
    CAPTION_TEMPLATES,
    CLASSNAMES,
    GLYPH_CAPTION_TEMPLATES,
    GLYPH_CLASSNAMES,
    GLYPH_PROMPT_TEMPLATES,
    GLYPHS,
    PROMPT_TEMPLATES,
    SEGMENT_CAPTION_TEMPLATES,
    SEGMENT_CLASSNAMES,
    SEGMENT_PROMPT_TEMPLATES,
)
from aclip.datamodules.synthetic.objects import (
    RGB,
    UNIT_POLYGONS,
    Box,
    CaptionedObject,
    Clutter,
    Glyph,
    Point,
    SegmentDigit,
    Shape,
    bounds,
    glyph_mask,
    place,
)

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


@dataclass(frozen=True)
class Ground:
    """A variant's background: per-pixel noise, uniform in [-noise, noise], over a brightness texture of
    standard deviation `texture_std` interpolated from a `texture_grid` x `texture_grid` grid (the finer
    the grid, the higher its frequencies)."""

    noise: int = _NOISE
    texture_std: float = _TEXTURE_STD
    texture_grid: int = _TEXTURE_GRID


@dataclass(frozen=True)
class Scene:
    """One image as plain data: its captioned objects (drawn on top), clutter, base colour and ground."""

    objects: tuple[CaptionedObject, ...]
    clutter: tuple[Clutter, ...]
    background: RGB
    ground: Ground = Ground()


def _hsv(hue: float, saturation: float, value: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def _lerp(u: float, interval: tuple[float, float]) -> float:
    return interval[0] + u * (interval[1] - interval[0])


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the area of the smaller box."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def _sample_object(rng: np.random.Generator, image_size: int, label: int) -> Shape:
    colour, shape = CLASSNAMES[label].split(" ")
    u_side, u_angle, u_x, u_y = rng.random(4).tolist()
    side = _lerp(u_side, _OBJECT_SIDE) * image_size * _SHAPE_SCALE[shape]
    if shape == "circle":
        polygon = None
        x0, y0, x1, y1 = -side / 2, -side / 2, side / 2, side / 2
    else:
        polygon = place(
            UNIT_POLYGONS[shape], (0.0, 0.0), side, _lerp(u_angle, (-_MAX_ROTATION, _MAX_ROTATION))
        )
        x0, y0, x1, y1 = bounds(polygon)
    # Shift so that the whole object lies inside the image.
    dx = -x0 + u_x * max(image_size - (x1 - x0), 0.0)
    dy = -y0 + u_y * max(image_size - (y1 - y0), 0.0)
    if polygon is not None:
        polygon = tuple((x + dx, y + dy) for x, y in polygon)
    return Shape(colour, shape, (x0 + dx, y0 + dy, x1 + dx, y1 + dy), polygon)


def _sample_clutter(rng: np.random.Generator, image_size: int) -> Clutter:
    u_hue, u_sat, u_val, u_size, u_x, u_y, u_kind, u_a, u_b = rng.random(9).tolist()
    colour = _hsv(u_hue, u_sat * _CLUTTER_MAX_SATURATION, _lerp(u_val, _CLUTTER_VALUE))
    size = _lerp(u_size, _CLUTTER_SIZE) * image_size
    cx, cy = u_x * image_size, u_y * image_size
    kind = ("ellipse", "rect", "line", "blob")[int(u_kind * 4)]
    if kind == "ellipse":
        rx, ry = size / 2, size / 2 * _lerp(u_a, (0.4, 1.0))
        return Clutter("ellipse", ((cx - rx, cy - ry), (cx + rx, cy + ry)), colour)
    if kind == "rect":
        vertices = place(UNIT_POLYGONS["square"], (cx, cy), size, u_a * 180, aspect=_lerp(u_b, (0.3, 1.0)))
        return Clutter("polygon", vertices, colour)
    if kind == "line":
        points = [(cx, cy)]
        for _ in range(1 + int(u_a * 2)):  # 2 or 3 points
            step_x, step_y = rng.normal(0.0, size / 2, size=2).tolist()
            points.append((points[-1][0] + step_x, points[-1][1] + step_y))
        return Clutter("line", tuple(points), colour, width=_lerp(u_b, (1.0, 2.5)))
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
    return Clutter("polygon", vertices, colour, centre=(cx, cy))


def sample_scene(
    rng: np.random.Generator,
    image_size: int,
    n_objects: int,
    classes: Sequence[int] | None = None,
    variant: str = "shapes",
) -> Scene:
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
    objects: list[CaptionedObject] = []
    for label in classes:
        # Keep objects mostly separate: retry placement, falling back to the least overlapping one.
        best: tuple[float, Shape] | None = None
        for _ in range(_PLACEMENT_TRIES):
            candidate = spec.sample_object(rng, image_size, int(label))
            overlap = max((_overlap(candidate.box, other.box) for other in objects), default=0.0)
            if best is None or overlap < best[0]:
                best = (overlap, candidate)
            if overlap <= _MAX_OVERLAP:
                break
        assert best is not None
        objects.append(best[1])
    return Scene(objects=tuple(objects), clutter=clutter, background=background, ground=spec.ground)


def num_objects(rng: np.random.Generator, max_objects: int) -> int:
    if max_objects == 1 or rng.random() < _P_SINGLE_OBJECT:
        return 1
    return 2


_GLYPH_HEIGHT = (0.26, 0.38)  # font size, as a fraction of the image side
_GLYPH_ROTATION = 15.0  # degrees
_GLYPH_SATURATION = (0.85, 1.0)  # saturated like the shapes, in any hue; captions never name it
_GLYPH_VALUE = (0.8, 1.0)


def _sample_glyph(rng: np.random.Generator, image_size: int, label: int) -> Glyph:
    u_size, u_angle, u_hue, u_sat, u_val, u_x, u_y = rng.random(7).tolist()
    pixels = max(6, round(_lerp(u_size, _GLYPH_HEIGHT) * image_size))
    angle = round(_lerp(u_angle, (-_GLYPH_ROTATION, _GLYPH_ROTATION)))
    height, width = glyph_mask(GLYPHS[label], pixels, angle).shape
    left, top = round(u_x * max(image_size - width, 0)), round(u_y * max(image_size - height, 0))
    colour = _hsv(u_hue, _lerp(u_sat, _GLYPH_SATURATION), _lerp(u_val, _GLYPH_VALUE))
    return Glyph(GLYPHS[label], colour, (left, top, left + width, top + height), pixels, angle)


# The segments a..g as pairs of frame corners, in units of the digit's width (x) and height (y) around
# its centre: a top, b upper right, c lower right, d bottom, e lower left, f upper left, g middle.
_SEGMENT_ENDS: tuple[tuple[Point, Point], ...] = (
    ((-0.5, -0.5), (0.5, -0.5)),
    ((0.5, -0.5), (0.5, 0.0)),
    ((0.5, 0.0), (0.5, 0.5)),
    ((-0.5, 0.5), (0.5, 0.5)),
    ((-0.5, 0.0), (-0.5, 0.5)),
    ((-0.5, -0.5), (-0.5, 0.0)),
    ((-0.5, 0.0), (0.5, 0.0)),
)
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
_SEGMENT_GROUND = Ground(noise=24, texture_std=16.0, texture_grid=16)  # noise and 4 px texture at 64 px


def _sample_segment_digit(rng: np.random.Generator, image_size: int, label: int) -> SegmentDigit:
    u_height, u_aspect, u_width, u_slant, u_angle, u_hue, u_sat, u_val, u_x, u_y = rng.random(10).tolist()
    height = _lerp(u_height, _SEGMENT_HEIGHT) * image_size
    aspect = 1 / _lerp(u_aspect, _SEGMENT_ASPECT)  # `place` scales y by it, x by the width
    slant = _lerp(u_slant, (-_SEGMENT_SLANT, _SEGMENT_SLANT)) * aspect
    angle = _lerp(u_angle, (-_SEGMENT_ROTATION, _SEGMENT_ROTATION))
    ends = []
    for (x0, y0), (x1, y1) in _SEGMENT_ENDS:
        inset_x, inset_y = _SEGMENT_GAP * (x1 - x0), _SEGMENT_GAP * (y1 - y0)
        ends += [(x0 + inset_x - slant * y0, y0 + inset_y), (x1 - inset_x - slant * y1, y1 - inset_y)]
    points = place(ends, (0.0, 0.0), height / aspect, angle, aspect)
    width = _lerp(u_width, _STROKE_WIDTH) * image_size
    x0, y0, x1, y1 = bounds(points)
    x0, y0, x1, y1 = x0 - width / 2, y0 - width / 2, x1 + width / 2, y1 + width / 2
    dx = -x0 + u_x * max(image_size - (x1 - x0), 0.0)
    dy = -y0 + u_y * max(image_size - (y1 - y0), 0.0)
    moved = [(x + dx, y + dy) for x, y in points]
    return SegmentDigit(
        digit=label,
        rgb=_hsv(u_hue, _lerp(u_sat, _STROKE_SATURATION), _lerp(u_val, _STROKE_VALUE)),
        segments=tuple(zip(moved[::2], moved[1::2], strict=True)),
        width=width,
        box=(x0 + dx, y0 + dy, x1 + dx, y1 + dy),
    )


def _sample_stroke(rng: np.random.Generator, image_size: int) -> Clutter:
    """A loose stroke, straight, with the digits' widths and brightness, desaturated as all clutter."""
    u_hue, u_sat, u_val, u_length, u_angle, u_width, u_x, u_y = rng.random(8).tolist()
    length = _lerp(u_length, _STROKE_LENGTH) * image_size
    dx, dy = length / 2 * math.cos(math.pi * u_angle), length / 2 * math.sin(math.pi * u_angle)
    cx, cy = u_x * image_size, u_y * image_size
    return Clutter(
        "line",
        ((cx - dx, cy - dy), (cx + dx, cy + dy)),
        _hsv(u_hue, u_sat * _CLUTTER_MAX_SATURATION, _lerp(u_val, _STROKE_VALUE)),
        width=_lerp(u_width, _STROKE_WIDTH) * image_size,
    )


@dataclass(frozen=True)
class Variant:
    """What a variant's scenes hold: its classes, prompts and captions, how it draws an object, and its
    ground: the background and the clutter (how many items, each drawn by `sample_clutter`)."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    caption_templates: tuple[tuple[str, str], ...]
    sample_object: Callable[[np.random.Generator, int, int], CaptionedObject]
    sample_clutter: Callable[[np.random.Generator, int], Clutter] = _sample_clutter
    n_clutter: tuple[int, int] = _N_CLUTTER
    ground: Ground = Ground()


VARIANTS: dict[str, Variant] = {
    "shapes": Variant(CLASSNAMES, PROMPT_TEMPLATES, CAPTION_TEMPLATES, _sample_object),
    "glyphs": Variant(GLYPH_CLASSNAMES, GLYPH_PROMPT_TEMPLATES, GLYPH_CAPTION_TEMPLATES, _sample_glyph),
    "segments": Variant(
        SEGMENT_CLASSNAMES,
        SEGMENT_PROMPT_TEMPLATES,
        SEGMENT_CAPTION_TEMPLATES,
        _sample_segment_digit,
        sample_clutter=_sample_stroke,
        n_clutter=_SEGMENT_CLUTTER,
        ground=_SEGMENT_GROUND,
    ),
}
