"""Rendering: a scene drawn into pixels, with vectorised NumPy (no per-pixel Python): a textured,
noisy ground, then the clutter, then the captioned objects on top, and the objects' coverage as a
fourth channel on request."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from aclip.datamodules import raster
from aclip.datamodules.synthetic.objects import RGB, Clutter, bounds
from aclip.datamodules.synthetic.scenes import Ground, Scene


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


def _background(base: RGB, size: int, rng: np.random.Generator, ground: Ground) -> np.ndarray:
    """The background [3, size, size] float32: a base colour, a brightness texture and per-pixel noise."""
    grid = ground.texture_grid
    coarse = rng.normal(0.0, ground.texture_std, size=(grid, grid)).astype(np.float32)
    upsample = _bilinear_upsampling(size, grid)
    texture = upsample @ coarse @ upsample.T  # bilinear interpolation of the coarse grid
    top, left = rng.integers(0, size, size=2)
    canvas = _noise_bank(size, ground.noise)[:, top : top + size, left : left + size] + texture
    canvas += np.asarray(base, dtype=np.float32)[:, None, None]
    return canvas


def _paint_clutter(canvas: np.ndarray, item: Clutter) -> None:
    size = canvas.shape[-1]
    colour = np.asarray(item.colour, dtype=np.float32)
    if item.kind == "line":
        found = raster.region(bounds(item.points), size, margin=item.width)
        if found is not None:
            where, xs, ys = found
            raster.paint(canvas, where, raster.polyline(xs, ys, item.points, item.width), colour)
        return
    found = raster.region(bounds(item.points), size)
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


def _draw(scene: Scene, image_size: int, rng: np.random.Generator, channels: int) -> np.ndarray:
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


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Tensor:
    """Draw ``scene`` as uint8 RGB pixels [3, size, size]; ``rng`` only drives the background texture
    and noise."""
    return torch.from_numpy(_draw(scene, image_size, rng, 3)).permute(2, 0, 1)


def render_with_mask(scene: Scene, image_size: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``scene``: its pixels [3, size, size] uint8 and its objects' coverage [size, size] uint8
    (255: fully the captioned objects'), the channels of one [H, W, 4] buffer, which
    `MultiViewTransform` cuts and resizes in one pass per crop."""
    channels = torch.from_numpy(_draw(scene, image_size, rng, 4)).permute(2, 0, 1)
    return channels[:3], channels[3]
