"""What a built-in scene holds, in pixels of the output image: the captioned objects of each variant
(coloured shapes, glyphs, seven-segment digits) with the pixels each covers, and the clutter's items.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from aclip.datamodules import raster
from aclip.datamodules.synthetic.captions import (
    CLASSNAMES,
    COLOURS,
    GLYPH_CLASSNAMES,
    GLYPHS,
    SEGMENT_CLASSNAMES,
)

_ARM = 0.18  # half-thickness of a cross arm, in units of its side
Point = tuple[float, float]
UNIT_POLYGONS: dict[str, tuple[Point, ...]] = {
    "square": ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "triangle": ((0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "cross": (
        (-_ARM, -0.5), (_ARM, -0.5), (_ARM, -_ARM), (0.5, -_ARM), (0.5, _ARM), (_ARM, _ARM),
        (_ARM, 0.5), (-_ARM, 0.5), (-_ARM, _ARM), (-0.5, _ARM), (-0.5, -_ARM), (-_ARM, -_ARM),
    ),
}  # fmt: skip

# The cross's two bars, convex, as indices of its polygon's vertices.
_CROSS_BARS = ((0, 1, 6, 7), (10, 3, 4, 9))
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Shape:
    """A captioned object, in pixels of the output image; it lies fully inside the image."""

    colour: str
    shape: str
    box: Box  # for a circle, its bounding square
    polygon: tuple[Point, ...] | None  # None for a circle

    @property
    def label(self) -> int:
        return CLASSNAMES.index(f"{self.colour} {self.shape}")

    @property
    def rgb(self) -> RGB:
        return COLOURS[self.colour]

    @property
    def phrases(self) -> dict[str, str]:
        """The words a caption template names the object with."""
        return {"colour": self.colour, "shape": self.shape}

    def coverage(self, size: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
        return _object_coverage(self, size)


@dataclass(frozen=True)
class Clutter:
    """A distractor: "ellipse" (points = two box corners), "polygon" or "line" (a polyline)."""

    kind: str
    points: tuple[Point, ...]
    colour: RGB
    width: float = 0.0  # line width in output pixels
    centre: Point = (0.0, 0.0)  # a blob's centre


# Geometry is plain Python: with at most 12 vertices, numpy's per-call overhead would dominate.
def place(
    unit: Sequence[Point], centre: Point, size: float, angle: float, aspect: float = 1.0
) -> tuple[Point, ...]:
    """Scale ``unit`` by ``size`` (y also by ``aspect``), rotate by ``angle`` degrees, move to ``centre``."""
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    cx, cy = centre
    return tuple(
        (cx + size * (x * cos + aspect * y * sin), cy + size * (aspect * y * cos - x * sin)) for x, y in unit
    )


def bounds(points: Sequence[Point]) -> Box:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    return (min(xs), min(ys), max(xs), max(ys))


def _object_coverage(obj: Shape, size: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
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
def glyph_mask(glyph: str, pixels: int, angle: int) -> np.ndarray:
    """The coverage [h, w] float32 of `glyph` at font size `pixels`, rotated by `angle` degrees, cropped."""
    rotated = _upright_glyph(glyph, pixels).rotate(angle, resample=Image.Resampling.BICUBIC)
    mask = np.asarray(rotated, dtype=np.float32) / 255
    rows, cols = np.nonzero(mask > 0)
    return np.ascontiguousarray(mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])


@dataclass(frozen=True)
class Glyph:
    """A captioned letter or digit, in pixels of the output image; it lies fully inside the image."""

    glyph: str
    rgb: RGB
    box: Box  # the top-left corner of its mask, and the corner plus the mask's size
    pixels: int  # font size
    angle: int  # degrees

    @property
    def label(self) -> int:
        return GLYPHS.index(self.glyph)

    @property
    def phrases(self) -> dict[str, str]:
        return {"name": GLYPH_CLASSNAMES[self.label]}

    def coverage(self, size: int) -> tuple[tuple[slice, slice], np.ndarray] | None:
        mask = glyph_mask(self.glyph, self.pixels, self.angle)
        top, left = int(self.box[1]), int(self.box[0])
        bottom, right = min(size, top + mask.shape[0]), min(size, left + mask.shape[1])
        return (slice(top, bottom), slice(left, right)), mask[: bottom - top, : right - left]


# The lit segments of each digit, as a seven-segment display draws them.
SEGMENTS_LIT: tuple[str, ...] = (
    "abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg",
)  # fmt: skip


@dataclass(frozen=True)
class SegmentDigit:
    """A captioned seven-segment digit, in pixels of the output image; it lies fully inside the image."""

    digit: int
    rgb: RGB
    segments: tuple[tuple[Point, Point], ...]  # all seven positions a..g, lit or not
    width: float  # stroke width in pixels
    box: Box  # the frame's bounds, strokes included

    @property
    def label(self) -> int:
        return self.digit

    @property
    def lit(self) -> tuple[tuple[Point, Point], ...]:
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


# The captioned objects of the three variants.
CaptionedObject = Shape | Glyph | SegmentDigit
