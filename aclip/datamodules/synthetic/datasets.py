"""The three datasets each variant comes as: training pairs, zero-shot classification and retrieval.

Sample ``i`` is a pure function of ``(seed, split, i)`` (and of which dataset class draws it): every
random draw comes from ``numpy.random.default_rng([seed, split_index, kind, i, stream])``, so images are
byte-identical whatever the worker or access order, and the splits "train", "val" and "test" are
independent streams.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from aclip.datamodules.synthetic.captions import sample_captions
from aclip.datamodules.synthetic.objects import CaptionedObject
from aclip.datamodules.synthetic.rendering import render, render_with_mask
from aclip.datamodules.synthetic.scenes import VARIANTS, Scene, num_objects, sample_scene

_SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# Dataset kinds and per-sample random streams: entries of each sample's seed sequence.
_KIND_CAPTIONS, _KIND_CLASSIFICATION, _KIND_RETRIEVAL = 0, 1, 2
_STREAM_SCENE, _STREAM_CAPTION, _STREAM_RENDER = 0, 1, 2


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

    def _scene(self, index: int, n_objects: int | None = None, classes: Sequence[int] | None = None) -> Scene:
        rng = self._rng(index, _STREAM_SCENE)
        n_objects = n_objects if n_objects is not None else num_objects(rng, self.max_objects)
        return sample_scene(rng, self.image_size, n_objects, classes, self.variant)

    # Every dataset draws sample `index` with its render stream, with or without the objects' coverage.
    def _render(self, scene: Scene, index: int) -> Tensor:
        return render(scene, self.image_size, self._rng(index, _STREAM_RENDER))

    def _render_with_mask(self, scene: Scene, index: int) -> tuple[Tensor, Tensor]:
        return render_with_mask(scene, self.image_size, self._rng(index, _STREAM_RENDER))


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
        templates = VARIANTS[self.variant].caption_templates
        (caption,) = sample_captions(scene.objects, self._rng(index, _STREAM_CAPTION), 1, templates)
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

    def objects(self, index: int) -> tuple[CaptionedObject, ...]:
        """The captioned object of sample ``index`` as drawn (its geometry, for analyses), in a 1-tuple."""
        return self._labelled_scene(self._index(index)).objects

    def _labelled_scene(self, index: int) -> Scene:
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
        self._scenes: list[Scene] = [self._scene(index) for index in range(self.size)]
        templates = VARIANTS[self.variant].caption_templates
        self.captions: list[list[str]] = [
            sample_captions(
                scene.objects, self._rng(index, _STREAM_CAPTION), self.captions_per_image, templates
            )
            for index, scene in enumerate(self._scenes)
        ]

    def __getitem__(self, index: int) -> Tensor:
        index = self._index(index)
        return self._render(self._scenes[index], index)
