"""Tests for the procedurally generated synthetic datasets."""

import colorsys
import dataclasses
import hashlib
import re
from collections import Counter

import numpy as np
import pytest
import torch

from aclip.datamodules import synthetic
from aclip.datamodules.synthetic import (
    CLASSNAMES,
    COLOURS,
    PROMPT_TEMPLATES,
    SHAPES,
    SyntheticCaptions,
    SyntheticClassification,
    SyntheticRetrieval,
)
from aclip.datamodules.synthetic.captions import CAPTION_TEMPLATES, _article, _caption
from aclip.datamodules.synthetic.objects import Shape
from aclip.datamodules.synthetic.rendering import render
from aclip.datamodules.synthetic.scenes import _CLUTTER_MAX_SATURATION, sample_scene

COLOUR_TOLERANCE = 40  # max per-channel distance for a pixel to count as a class colour


def hwc(image: torch.Tensor) -> np.ndarray:
    """The datasets' uint8 pixels [3, H, W] as an [H, W, 3] array."""
    return image.permute(1, 2, 0).numpy()


def colour_fraction(image: torch.Tensor, colour: str) -> float:
    """Fraction of pixels within COLOUR_TOLERANCE of the class colour ``colour``."""
    pixels = hwc(image).astype(np.int16)
    distance = np.abs(pixels - np.asarray(COLOURS[colour], dtype=np.int16)).max(axis=-1)
    return float((distance <= COLOUR_TOLERANCE).mean())


def named_colours(caption: str) -> set[str]:
    return {word for word in re.findall(r"[a-z]+", caption) if word in COLOURS}


def named_shapes(caption: str) -> set[str]:
    return {word for word in re.findall(r"[a-z]+", caption) if word in SHAPES}


def test_constants() -> None:
    assert len(COLOURS) == 6 and len(SHAPES) == 4
    assert tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES) == CLASSNAMES
    assert 6 <= len(PROMPT_TEMPLATES) <= 8
    assert all(template.count("{}") == 1 for template in PROMPT_TEMPLATES)
    assert len(CAPTION_TEMPLATES) >= 6
    # Class colours must be saturated, so desaturated clutter can never be mistaken for them.
    for rgb in COLOURS.values():
        assert colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[1] > 0.8


def _items(dataset, indices):
    """Comparable items: image bytes plus the caption or label, whatever the dataset returns."""
    out = []
    for i in indices:
        item = dataset[i]
        image, *extra = item if isinstance(item, tuple) else (item,)
        extra = extra[0] if len(extra) == 1 else tuple(extra) or None
        if isinstance(extra, tuple):  # (caption, {"object_mask": ...})
            extra = (extra[0], extra[1]["object_mask"].numpy().tobytes())
        out.append((image.numpy().tobytes(), extra))
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: SyntheticCaptions(size=40, seed=5),
        lambda: SyntheticClassification(size=40, seed=5),
        lambda: SyntheticRetrieval(size=40, seed=5, captions_per_image=3),
        lambda: SyntheticCaptions(size=40, seed=5, variant="segments", object_masks=True),
        lambda: SyntheticClassification(size=40, seed=5, variant="segments"),
        lambda: SyntheticRetrieval(size=40, seed=5, captions_per_image=3, variant="segments"),
    ],
    ids=[
        "captions",
        "classification",
        "retrieval",
        "segments captions",
        "segments classification",
        "segments retrieval",
    ],
)
def test_deterministic_across_instances_and_access_order(make) -> None:
    first, second = make(), make()
    forward = _items(first, range(12))
    backward = _items(second, reversed(range(12)))[::-1]
    assert forward == backward
    # Repeated and interleaved access on the same instance changes nothing either.
    assert _items(first, [7, 3, 7, 0]) == [forward[7], forward[3], forward[7], forward[0]]
    if isinstance(first, SyntheticRetrieval):
        assert first.captions == second.captions


@pytest.mark.parametrize("cls", [SyntheticCaptions, SyntheticClassification, SyntheticRetrieval])
def test_seeds_and_splits_are_different_streams(cls) -> None:
    variants = [cls(size=8, seed=0, split="train"), cls(size=8, seed=1, split="train")]
    variants += [cls(size=8, seed=0, split=split) for split in ("val", "test")]
    for i in range(4):
        images = [_items(dataset, [i])[0][0] for dataset in variants]
        assert len(set(images)) == len(images)


def test_negative_and_out_of_range_indices() -> None:
    dataset = SyntheticCaptions(size=5)
    assert _items(dataset, [-1]) == _items(dataset, [4])
    with pytest.raises(IndexError):
        dataset[5]
    with pytest.raises(IndexError):
        SyntheticRetrieval(size=3)[3]


@pytest.mark.parametrize("image_size", [32, 64])
def test_image_size_and_mode(image_size: int) -> None:
    image, caption = SyntheticCaptions(size=4, image_size=image_size)[0]
    assert isinstance(caption, str)
    images = [image, SyntheticClassification(size=4, image_size=image_size)[1][0]]
    images.append(SyntheticRetrieval(size=4, image_size=image_size)[2])
    for image in images:
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
        assert image.shape == (3, image_size, image_size)


def test_captions_match_their_images() -> None:
    dataset = SyntheticCaptions(size=60)
    n_objects = Counter()
    for i in range(len(dataset)):
        image, caption = dataset[i]
        colours, shapes = named_colours(caption), named_shapes(caption)
        count = caption.count(" and ") + 1
        n_objects[count] += 1
        assert 1 <= len(colours) <= count and 1 <= len(shapes) <= count
        for colour in colours:
            assert colour_fraction(image, colour) > 0.02, (i, caption)
        # No class colour appears in the image unless the caption names it.
        for colour in set(COLOURS) - colours:
            assert colour_fraction(image, colour) < 0.01, (i, caption, colour)
    assert set(n_objects) == {1, 2}
    assert 0.4 < n_objects[1] / len(dataset) < 0.85


def test_max_objects_one_gives_single_object_captions() -> None:
    dataset = SyntheticCaptions(size=30, max_objects=1)
    assert all(" and " not in dataset[i][1] for i in range(len(dataset)))


def test_caption_wording() -> None:
    red_circle = Shape("red", "circle", (0.0, 0.0, 10.0, 10.0), None)
    blue_cross = Shape("blue", "cross", (20.0, 20.0, 30.0, 30.0), ())
    there = ("there {be} {objs} in the picture.", "{colour} {shape}")
    assert _caption([red_circle], there) == "there is a red circle in the picture."
    assert _caption([blue_cross, red_circle], there) == (
        "there are a blue cross and a red circle in the picture."
    )
    coloured = ("{objs}.", "{shape} coloured {colour}")
    assert _caption([red_circle], coloured) == "a circle coloured red."
    assert _article("orange cube") == "an"
    assert _article("red cube") == "a"


def test_caption_templates_all_name_every_object() -> None:
    objects = [
        Shape("magenta", "triangle", (0.0, 0.0, 1.0, 1.0), ()),
        Shape("cyan", "square", (0.0, 0.0, 1.0, 1.0), ()),
    ]
    captions = {_caption(objects, template) for template in CAPTION_TEMPLATES}
    assert len(captions) == len(CAPTION_TEMPLATES)
    for caption in captions:
        assert named_colours(caption) == {"magenta", "cyan"}
        assert named_shapes(caption) == {"triangle", "square"}
        assert "{" not in caption and "  " not in caption


def test_classification_labels_balanced_and_visible() -> None:
    dataset = SyntheticClassification(size=72, seed=3)
    assert dataset.classnames == CLASSNAMES and dataset.templates == PROMPT_TEMPLATES
    labels = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert isinstance(label, int) and 0 <= label < len(CLASSNAMES)
        assert dataset.label(i) == label
        labels.append(label)
        colour = CLASSNAMES[label].split(" ")[0]
        # The object is clearly visible but covers only a minority of the image.
        assert 0.04 < colour_fraction(image, colour) < 0.4, (i, CLASSNAMES[label])
        for other in set(COLOURS) - {colour}:
            assert colour_fraction(image, other) < 0.01
    assert set(Counter(labels).values()) == {3}
    counts = Counter(SyntheticClassification(size=50).label(i) for i in range(50))
    assert len(counts) == len(CLASSNAMES) and max(counts.values()) - min(counts.values()) <= 1


def area(points) -> float:
    """Shoelace area of a polygon."""
    xs, ys = np.asarray(points, dtype=float).T
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def test_scene_objects_inside_image_and_larger_than_clutter() -> None:
    image_size = 64
    for i in range(50):
        rng = np.random.default_rng(i)
        scene = sample_scene(rng, image_size, n_objects=2)
        assert len({obj.label for obj in scene.objects}) == 2
        assert 4 <= len(scene.clutter) <= 10
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            assert max(x1 - x0, y1 - y0) >= 0.3 * image_size
        object_areas = [
            np.pi * ((obj.box[2] - obj.box[0]) / 2) ** 2 if obj.polygon is None else area(obj.polygon)
            for obj in scene.objects
        ]
        assert all(0.06 < a / image_size**2 < 0.26 for a in object_areas)
        for item in scene.clutter:
            if item.kind == "ellipse":
                (x0, y0), (x1, y1) = item.points
                assert np.pi * (x1 - x0) * (y1 - y0) / 4 < min(object_areas)
            elif item.kind == "polygon":
                assert area(item.points) < min(object_areas)
            saturation = colorsys.rgb_to_hsv(*(c / 255 for c in item.colour))[1]
            assert saturation <= _CLUTTER_MAX_SATURATION + 0.02
    scene = sample_scene(np.random.default_rng(0), image_size, 1, classes=[5])
    assert [obj.label for obj in scene.objects] == [5]


def test_clutter_is_drawn_and_desaturated() -> None:
    for i in range(10):
        scene = sample_scene(np.random.default_rng(i), 64, n_objects=1)
        with_clutter = hwc(render(scene, 64, np.random.default_rng(0))).astype(np.int16)
        bare_scene = dataclasses.replace(scene, clutter=())
        bare = hwc(render(bare_scene, 64, np.random.default_rng(0))).astype(np.int16)
        changed = np.abs(with_clutter - bare).max(axis=-1) > 30
        assert changed.mean() > 0.01, i
        # Where clutter shows, it is grey-ish: far less saturated than any class colour.
        chroma = with_clutter.max(axis=-1) - with_clutter.min(axis=-1)
        assert np.median(chroma[changed]) < 80


def test_clutter_free_classification_draws_the_same_scenes_without_clutter() -> None:
    cluttered, clean = (
        SyntheticClassification(size=24, seed=2),
        SyntheticClassification(size=24, seed=2, clutter=False),
    )
    for i in range(len(clean)):
        (with_clutter, label), (bare, bare_label) = cluttered[i], clean[i]
        assert bare_label == label
        with_clutter, bare = hwc(with_clutter).astype(np.int16), hwc(bare).astype(np.int16)
        changed = (np.abs(with_clutter - bare).max(axis=-1) > 30).mean()
        assert 0 < changed < 0.5, i  # the clutter is gone, the rest of the image stays
        colour = CLASSNAMES[label].split(" ")[0]
        # The object is the same: its colour covers the same share of both images.
        assert colour_fraction(clean[i][0], colour) == pytest.approx(
            colour_fraction(cluttered[i][0], colour), abs=0.01
        )


def test_retrieval_captions() -> None:
    dataset = SyntheticRetrieval(size=20, captions_per_image=3, seed=2)
    assert len(dataset) == len(dataset.captions) == 20
    for i, captions in enumerate(dataset.captions):
        assert len(captions) == len(set(captions)) == 3
        # All captions of an image describe the same objects.
        assert len({frozenset(named_colours(c)) for c in captions}) == 1
        assert len({frozenset(named_shapes(c)) for c in captions}) == 1
        image = dataset[i]
        for colour in named_colours(captions[0]):
            assert colour_fraction(image, colour) > 0.02
    every_template = SyntheticRetrieval(size=2, captions_per_image=len(CAPTION_TEMPLATES))
    assert all(len(set(c)) == len(CAPTION_TEMPLATES) for c in every_template.captions)
    single = SyntheticRetrieval(size=10, max_objects=1, captions_per_image=1)
    assert all(len(c) == 1 and " and " not in c[0] for c in single.captions)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SyntheticCaptions(size=0),
        lambda: SyntheticCaptions(size=2.5),
        lambda: SyntheticCaptions(image_size=15),
        lambda: SyntheticCaptions(split="training"),
        lambda: SyntheticCaptions(seed=-1),
        lambda: SyntheticCaptions(max_objects=3),
        lambda: SyntheticCaptions(max_objects=0),
        lambda: SyntheticClassification(size=-3),
        lambda: SyntheticClassification(split="dev"),
        lambda: SyntheticClassification(image_size=8),
        lambda: SyntheticRetrieval(captions_per_image=0),
        lambda: SyntheticRetrieval(captions_per_image=len(CAPTION_TEMPLATES) + 1),
        lambda: SyntheticRetrieval(max_objects=3),
        lambda: SyntheticRetrieval(split=None),
    ],
)
def test_invalid_arguments(make) -> None:
    with pytest.raises(ValueError):
        make()


# --- Every variant's outputs are pinned: a change to the shared machinery must not move them.


def digest(dataset, count: int) -> str:
    """A short hash of the first `count` items of `dataset`: pixels, captions or labels, object masks."""
    hashed = hashlib.sha256()
    for i in range(count):
        item = dataset[i]
        for part in item if isinstance(item, tuple) else (item,):
            if isinstance(part, dict):
                part = part["object_mask"]
            hashed.update(part.numpy().tobytes() if isinstance(part, torch.Tensor) else repr(part).encode())
    if isinstance(dataset, SyntheticRetrieval):
        hashed.update(repr(dataset.captions).encode())
    return hashed.hexdigest()[:16]


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        # Recorded before the segments variant was added: the shapes and glyphs draw as they always did.
        ("shapes", ("1f79c462378ae113", "a987a2567400cabb", "59cff46a015e7243")),
        ("glyphs", ("ecfc0751d53b2e19", "0df97c7781606079", "9cbd45af481a89a0")),
        ("segments", ("0bd8d8115250354c", "fd1e24b928ccda76", "c44caace9cd5a2e8")),
    ],
)
def test_each_variant_draws_the_samples_it_always_drew(variant, expected) -> None:
    assert (
        digest(SyntheticCaptions(size=16, seed=3, variant=variant, object_masks=True), 16),
        digest(SyntheticClassification(size=16, seed=3, variant=variant), 16),
        digest(SyntheticRetrieval(size=8, seed=3, variant=variant), 8),
    ) == expected


# The evaluation sets as conf/eval/<variant>.yaml builds them (classification also its names and prompts),
# and 40 training pairs with their object masks, at the tiny model's 64 px: recorded on the one-module
# synthetic.py, before it was split by job (captions, objects, scenes, rendering, datasets).
EVALUATION_SIZES = {"shapes": 960, "glyphs": 1020, "segments": 1000}


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("shapes", ("ec84314392618703", "f5be336887bd02a7", "3c73df757d3ba2e2", "8ae2f9569e3a3a07")),
        ("glyphs", ("46b4c549fc29a974", "1ccb3ad9f233e454", "b44ceda470126f73", "07875f42a0ab496e")),
        ("segments", ("6b7833873f73aa03", "0e79d56fe4bd288f", "4bcc4820fde751be", "bcaf5f1c3d581c29")),
    ],
)
def test_forty_samples_of_each_dataset_keep_their_hashes(variant, expected) -> None:
    classification = SyntheticClassification(size=EVALUATION_SIZES[variant], variant=variant)
    names = hashlib.sha256(repr((classification.classnames, classification.templates)).encode())
    assert (
        digest(SyntheticCaptions(variant=variant, object_masks=True), 40),
        digest(classification, 40),
        names.hexdigest()[:16],
        digest(SyntheticRetrieval(variant=variant), 40),
    ) == expected


# --- The segments variant: seven-segment digits in thin strokes on a noisy ground among loose strokes.

DIGIT_NAMES = "|".join(synthetic.SEGMENT_DIGITS)


def named_digits(caption: str) -> list[str]:
    return re.findall(rf"digit ({DIGIT_NAMES})\b", caption)


def test_segment_digits_are_told_apart_by_one_or_two_of_their_segments() -> None:
    lit = [set(segments) for segments in synthetic.SEGMENTS_LIT]
    assert len(lit) == len(synthetic.SEGMENT_CLASSNAMES) == 10
    assert len({frozenset(segments) for segments in lit}) == 10  # every digit is drawn differently
    nearest = [min(len(a ^ b) for b in lit if b is not a) for a in lit]
    assert max(nearest) <= 2 and nearest.count(1) >= 6  # what makes half a digit ambiguous


def test_segments_captions_name_one_or_two_different_digits_and_the_masks_are_their_strokes() -> None:
    dataset = SyntheticCaptions(size=40, variant="segments", object_masks=True)
    counts = Counter()
    for i in range(len(dataset)):
        image, caption, masks = dataset[i]
        digits = named_digits(caption)
        counts[len(digits)] += 1
        assert len(digits) == len(set(digits)) and "colour" not in caption.replace("coloured", ""), caption
        mask = masks["object_mask"].numpy()
        # Thin strokes: a few percent of the image per digit.
        assert 0.005 < (mask / 255).mean() < 0.05 * len(digits), (i, caption)
        if len(digits) == 1:
            rows, cols = np.nonzero(mask)
            assert 0.08 < (np.ptp(rows) + 1) * (np.ptp(cols) + 1) / mask.size < 0.25  # the digit's frame
            # Where the mask is full, the pixels are the digit's one colour, a stroke colour.
            drawn = hwc(image)[mask == 255]
            assert len(np.unique(drawn, axis=0)) == 1, i
            _, saturation, value = colorsys.rgb_to_hsv(*(drawn[0] / 255))
            assert saturation > 0.35 and value > 0.65
    assert set(counts) == {1, 2}


def test_segments_classification_draws_the_labelled_digit_in_a_tenth_of_the_image() -> None:
    dataset = SyntheticClassification(size=30, seed=1, variant="segments")
    assert dataset.classnames == synthetic.SEGMENT_CLASSNAMES
    assert dataset.templates == synthetic.SEGMENT_PROMPT_TEMPLATES
    for i in range(len(dataset)):
        image, label = dataset[i]
        (digit,) = dataset.objects(i)
        assert label == i % 10 == digit.digit and image.shape == (3, 64, 64)
        x0, y0, x1, y1 = digit.box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert 0.08 < (x1 - x0) * (y1 - y0) / 64**2 < 0.25  # "about 10 to 20 % of the image"
        assert len(digit.lit) == len(synthetic.SEGMENTS_LIT[label])


def test_segments_clutter_is_loose_grey_strokes_like_the_digits_on_a_noisier_finer_ground() -> None:
    for i in range(20):
        scene = sample_scene(np.random.default_rng(i), 64, 1, variant="segments")
        (digit,) = scene.objects
        assert 8 <= len(scene.clutter) <= 16
        for item in scene.clutter:
            assert item.kind == "line" and len(item.points) == 2
            assert 0.022 * 64 <= item.width <= 0.036 * 64 and 0.022 * 64 <= digit.width <= 0.036 * 64
            _, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in item.colour))
            assert value > 0.69  # as bright as the digits' strokes, but never saturated as they are
            assert saturation <= _CLUTTER_MAX_SATURATION + 0.02

    def ground(variant: str) -> np.ndarray:
        scene = sample_scene(np.random.default_rng(0), 64, 1, variant=variant)
        bare = dataclasses.replace(scene, objects=(), clutter=())
        return hwc(render(bare, 64, np.random.default_rng(0))).astype(np.float32)

    def fine_detail(image: np.ndarray) -> float:  # the mean change from one pixel to the next
        return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())

    assert fine_detail(ground("segments")) > 2.5 * fine_detail(ground("shapes"))


def test_segments_retrieval_captions_describe_the_same_digits() -> None:
    dataset = SyntheticRetrieval(size=12, captions_per_image=3, seed=2, variant="segments")
    for captions in dataset.captions:
        assert len(set(captions)) == 3
        assert len({frozenset(named_digits(caption)) for caption in captions}) == 1
    with pytest.raises(ValueError):
        SyntheticRetrieval(size=2, variant="segments", captions_per_image=9)
