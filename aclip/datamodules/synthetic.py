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

Three datasets share one scene sampler and renderer:

* :class:`SyntheticCaptions`: ``(image, caption)`` training pairs.
* :class:`SyntheticClassification`: zero-shot classification, one object per image, balanced labels.
* :class:`SyntheticRetrieval`: image-text retrieval, several different captions per image.
"""

from __future__ import annotations

import colorsys
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

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

_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap antialiasing
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
_NOISE = 16  # per-pixel noise, uniform in [-_NOISE, _NOISE] at the supersampled resolution
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


@dataclass(frozen=True)
class _Clutter:
    """A distractor: "ellipse" (points = two box corners), "polygon" or "line" (a polyline)."""

    kind: str
    points: tuple[_Point, ...]
    colour: _RGB
    width: float = 0.0  # line width in output pixels


@dataclass(frozen=True)
class _Scene:
    objects: tuple[_Object, ...]
    clutter: tuple[_Clutter, ...]
    background: _RGB


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
    return _Clutter("polygon", vertices, colour)


def _sample_scene(
    rng: np.random.Generator, image_size: int, n_objects: int, classes: Sequence[int] | None = None
) -> _Scene:
    """Sample a scene with ``n_objects`` objects of distinct classes (``classes`` if given)."""
    u_hue, u_sat, u_val, u_clutter = rng.random(4).tolist()
    background = _hsv(
        _lerp(u_hue, _BACKGROUND_HUE), u_sat * _BACKGROUND_MAX_SATURATION, _lerp(u_val, _BACKGROUND_VALUE)
    )
    n_clutter = _N_CLUTTER[0] + int(u_clutter * (_N_CLUTTER[1] - _N_CLUTTER[0] + 1))
    clutter = tuple(_sample_clutter(rng, image_size) for _ in range(n_clutter))
    if classes is None:
        classes = rng.choice(len(CLASSNAMES), size=n_objects, replace=False).tolist()
    if len(classes) != n_objects:
        raise ValueError(f"got {len(classes)} classes for {n_objects} objects")
    objects: list[_Object] = []
    for label in classes:
        # Keep objects mostly separate: retry placement, falling back to the least overlapping one.
        best: tuple[float, _Object] | None = None
        for _ in range(_PLACEMENT_TRIES):
            candidate = _sample_object(rng, image_size, int(label))
            overlap = max((_overlap(candidate.box, other.box) for other in objects), default=0.0)
            if best is None or overlap < best[0]:
                best = (overlap, candidate)
            if overlap <= _MAX_OVERLAP:
                break
        assert best is not None
        objects.append(best[1])
    return _Scene(objects=tuple(objects), clutter=clutter, background=background)


def _num_objects(rng: np.random.Generator, max_objects: int) -> int:
    if max_objects == 1 or rng.random() < _P_SINGLE_OBJECT:
        return 1
    return 2


def _background(base: _RGB, size: int, rng: np.random.Generator) -> Image.Image:
    coarse = rng.normal(0.0, _TEXTURE_STD, size=(_TEXTURE_GRID, _TEXTURE_GRID)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    # Integer noise is several times cheaper to draw than Gaussian; box downsampling smooths it anyway.
    noise = rng.integers(-_NOISE, _NOISE + 1, size=(size, size, 3), dtype=np.int16)
    pixels = np.asarray(base, dtype=np.int16) + np.rint(texture).astype(np.int16)[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _render(scene: _Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` only drives the background texture and noise."""
    scale = _SUPERSAMPLE
    canvas = _background(scene.background, image_size * scale, rng)
    draw = ImageDraw.Draw(canvas)
    for item in scene.clutter:
        points = [(x * scale, y * scale) for x, y in item.points]
        if item.kind == "ellipse":
            draw.ellipse(points, fill=item.colour)
        elif item.kind == "polygon":
            draw.polygon(points, fill=item.colour)
        else:
            draw.line(points, fill=item.colour, width=max(1, round(item.width * scale)), joint="curve")
    for obj in scene.objects:  # after the clutter, so objects are on top
        fill = COLOURS[obj.colour]
        if obj.polygon is None:
            draw.ellipse([coordinate * scale for coordinate in obj.box], fill=fill)
        else:
            draw.polygon([(x * scale, y * scale) for x, y in obj.polygon], fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _caption(objects: Sequence[_Object], template: tuple[str, str]) -> str:
    """Caption ``objects`` (in this order) with one of ``_CAPTION_TEMPLATES``."""
    sentence, phrase = template
    phrases = [phrase.format(colour=obj.colour, shape=obj.shape) for obj in objects]
    joined = " and ".join(f"{_article(p)} {p}" for p in phrases)
    return sentence.format(objs=joined, be="is" if len(objects) == 1 else "are")


def _sample_captions(scene: _Scene, rng: np.random.Generator, k: int) -> list[str]:
    """``k`` captions of ``scene`` with distinct templates, each listing the objects in random order."""
    templates = rng.choice(len(_CAPTION_TEMPLATES), size=k, replace=False)
    captions = []
    for template in templates.tolist():
        order = rng.permutation(len(scene.objects)).tolist()
        captions.append(_caption([scene.objects[j] for j in order], _CAPTION_TEMPLATES[template]))
    return captions


def _check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return int(value)


class _SyntheticBase(Dataset):
    """Argument checks and per-sample random streams shared by the three datasets."""

    _kind: int

    def __init__(self, size: int, image_size: int, seed: int, split: str) -> None:
        self.size = _check_int("size", size, 1)
        self.image_size = _check_int("image_size", image_size, 16)
        self.seed = _check_int("seed", seed, 0)
        if not isinstance(split, str) or split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.split = split

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
        return np.random.default_rng([self.seed, _SPLITS[self.split], self._kind, index, stream])

    def _image(self, scene: _Scene, index: int) -> Image.Image:
        return _render(scene, self.image_size, self._rng(index, _STREAM_RENDER))


class SyntheticCaptions(_SyntheticBase):
    """Training pairs: (PIL image, caption)."""

    _kind = _KIND_CAPTIONS

    def __init__(
        self,
        size: int = 20000,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        max_objects: int = 2,
    ) -> None:
        super().__init__(size, image_size, seed, split)
        self.max_objects = _check_int("max_objects", max_objects, 1, 2)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        index = self._index(index)
        rng = self._rng(index, _STREAM_SCENE)
        scene = _sample_scene(rng, self.image_size, _num_objects(rng, self.max_objects))
        (caption,) = _sample_captions(scene, self._rng(index, _STREAM_CAPTION), 1)
        return self._image(scene, index), caption


class SyntheticClassification(_SyntheticBase):
    """Held-out zero-shot classification: one object per image, label = CLASSNAMES index (balanced)."""

    _kind = _KIND_CLASSIFICATION
    classnames: tuple[str, ...] = CLASSNAMES
    templates: tuple[str, ...] = PROMPT_TEMPLATES

    def __init__(self, size: int = 960, image_size: int = 64, seed: int = 0, split: str = "test") -> None:
        super().__init__(size, image_size, seed, split)

    def label(self, index: int) -> int:
        """The label of sample ``index`` without rendering it."""
        return self._index(index) % len(CLASSNAMES)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = self._index(index)
        label = self.label(index)
        scene = _sample_scene(self._rng(index, _STREAM_SCENE), self.image_size, 1, classes=(label,))
        return self._image(scene, index), label


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
    ) -> None:
        super().__init__(size, image_size, seed, split)
        self.captions_per_image = _check_int(
            "captions_per_image", captions_per_image, 1, len(_CAPTION_TEMPLATES)
        )
        self.max_objects = _check_int("max_objects", max_objects, 1, 2)
        # Scenes are cheap to sample and tiny; keeping them makes captions and images agree by construction.
        self._scenes: list[_Scene] = []
        for index in range(self.size):
            rng = self._rng(index, _STREAM_SCENE)
            self._scenes.append(_sample_scene(rng, self.image_size, _num_objects(rng, self.max_objects)))
        self.captions: list[list[str]] = [
            _sample_captions(scene, self._rng(index, _STREAM_CAPTION), self.captions_per_image)
            for index, scene in enumerate(self._scenes)
        ]

    def __getitem__(self, index: int) -> Image.Image:
        index = self._index(index)
        return self._image(self._scenes[index], index)
