"""Anti-aliased rasterisation of simple shapes into a numpy canvas [3, H, W], vectorised over the pixels.

Each shape is evaluated only over its bounding box. Its coverage of a pixel is approximated from the
signed distance d (in pixels, negative inside) of the pixel's centre to the shape's boundary as
clip(0.5 - d, 0, 1): exact for a straight edge through the pixel, a close approximation for curves and
corners, and one pass instead of the supersampling it replaces.

Coordinates are continuous pixels: pixel (row i, column j) covers [j, j + 1] x [i, i + 1], its centre is
(j + 0.5, i + 0.5), x to the right, y down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Point = tuple[float, float]
# The pixel block a shape touches: (row slice, column slice), and its centres' coordinates [h, 1], [1, w].
Region = tuple[tuple[slice, slice], np.ndarray, np.ndarray]


def region(bounds: tuple[float, float, float, float], size: int, margin: float = 1.0) -> Region | None:
    """The pixels of a `size` x `size` canvas within `bounds` (x0, y0, x1, y1) widened by `margin`, with
    the coordinates of their centres; None if the box misses the canvas."""
    x0, y0, x1, y1 = bounds
    c0, r0 = max(0, int(np.floor(x0 - margin))), max(0, int(np.floor(y0 - margin)))
    c1, r1 = min(size, int(np.ceil(x1 + margin))), min(size, int(np.ceil(y1 + margin)))
    if c0 >= c1 or r0 >= r1:
        return None
    ys = (np.arange(r0, r1, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(c0, c1, dtype=np.float32) + 0.5)[None, :]
    return (slice(r0, r1), slice(c0, c1)), xs, ys


def _coverage(distance: np.ndarray) -> np.ndarray:
    coverage = np.subtract(0.5, distance, dtype=np.float32)
    np.maximum(coverage, 0.0, out=coverage)
    return np.minimum(coverage, 1.0, out=coverage)


def disc(xs: np.ndarray, ys: np.ndarray, centre: Point, radius: float) -> np.ndarray:
    """Coverage of a disc."""
    return _coverage(np.sqrt((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) - radius)


def ellipse(xs: np.ndarray, ys: np.ndarray, centre: Point, rx: float, ry: float) -> np.ndarray:
    """Coverage of an axis-aligned ellipse (the distance scaled by its smaller radius)."""
    normalised = np.sqrt(((xs - centre[0]) / rx) ** 2 + ((ys - centre[1]) / ry) ** 2)
    return _coverage((normalised - 1.0) * min(rx, ry))


def convex_polygon(xs: np.ndarray, ys: np.ndarray, vertices: Sequence[Point]) -> np.ndarray:
    """Coverage of a convex polygon (either orientation): the signed distance is the largest of the
    distances to its edges' lines (exact inside and across an edge, close near a corner)."""
    # A handful of vertices: plain Python, where numpy's per-call overhead would dominate.
    following = [*vertices[1:], vertices[0]]
    signed_area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(vertices, following, strict=True))
    orientation = 1.0 if signed_area > 0 else -1.0
    distance = None
    for (x0, y0), (x1, y1) in zip(vertices, following, strict=True):
        # The outward unit normal: right of the edge for a counter-clockwise polygon in y-down coordinates.
        length = math.hypot(x1 - x0, y1 - y0) or 1.0
        nx, ny = orientation * (y1 - y0) / length, -orientation * (x1 - x0) / length
        edge = (xs - x0) * nx + (ys - y0) * ny
        distance = edge if distance is None else np.maximum(distance, edge, out=distance)
    return _coverage(distance)


def polyline(xs: np.ndarray, ys: np.ndarray, points: Sequence[Point], width: float) -> np.ndarray:
    """Coverage of a polyline `width` pixels thick, with round joints and caps."""
    ends = np.asarray(points, dtype=np.float32)
    return strokes(xs, ys, ends[:-1], ends[1:], width)


def strokes(xs: np.ndarray, ys: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: float) -> np.ndarray:
    """Coverage of the union of straight strokes from `starts` to `ends` (float32 [n, 2] each), `width`
    pixels thick, with round caps."""
    start, step = starts[:, :, None, None], (ends - starts)[:, :, None, None]  # [segments, 2, 1, 1]
    length = np.maximum((step**2).sum(axis=1), 1e-12)
    dx, dy = xs[None] - start[:, 0], ys[None] - start[:, 1]  # every segment at once: [segments, h, w]
    t = np.clip((dx * step[:, 0] + dy * step[:, 1]) / length, 0.0, 1.0)
    distance = np.sqrt((dx - t * step[:, 0]) ** 2 + (dy - t * step[:, 1]) ** 2).min(axis=0)
    return _coverage(distance - width / 2)


def star(
    xs: np.ndarray, ys: np.ndarray, centre: Point, angles: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    """Coverage of a star-shaped blob: boundary radius `radii` at `angles` (fractions of a turn, sorted),
    interpolated linearly in angle between them."""
    dx, dy = xs - centre[0], ys - centre[1]
    theta = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    turns = np.concatenate([[angles[-1] - 1.0], angles, [angles[0] + 1.0]])
    boundary = np.interp(theta, turns, np.concatenate([[radii[-1]], radii, [radii[0]]]))
    return _coverage(np.sqrt(dx * dx + dy * dy) - boundary)


def paint(canvas: np.ndarray, where: tuple[slice, slice], coverage: np.ndarray, colour: np.ndarray) -> None:
    """Blend `colour` [3] over the pixels `where` of `canvas` ([3, H, W] float32, channels first: the
    pixel loops then run along rows) by `coverage` [h, w], in place."""
    block = canvas[(slice(None), *where)]
    block += coverage[None] * (colour[:, None, None] - block)
