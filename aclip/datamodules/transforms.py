"""Image transforms for training views and evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F

INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def _interpolation(name: str) -> T.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def eval_transform(image_size: int, interpolation: str = "bicubic") -> T.Compose:
    """Resize the short side, centre-crop, to a float tensor in [0, 1] (the model normalises it)."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=_interpolation(interpolation)),
            T.CenterCrop(image_size),
            T.ToTensor(),
        ]
    )


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a pair of numbers (low, high), got {value!r}") from error
    return low, high


def _probability(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"augment.{name} is a probability and must be in [0, 1], got {value}")
    return float(value)


class PhotometricAugment:
    """The photometric augmentation of an online view (SimCLR / MoCo v3 style, as in A-CLIP's code):
    colour jitter, greyscale, Gaussian blur and solarisation, each applied with its probability, in
    that order, after the view's crop. All probabilities 0 (the default) apply nothing.

    Args:
        color_jitter: brightness, contrast, saturation and hue strengths of `ColorJitter`.
        color_jitter_p, grayscale_p, blur_p, solarize_p: the probability of each.
        blur_sigma: range of the Gaussian blur's standard deviation, in pixels of the view.
    """

    def __init__(
        self,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.0,
        grayscale_p: float = 0.0,
        blur_p: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: float = 0.0,
    ) -> None:
        jitter = [float(v) for v in color_jitter]
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                "augment.color_jitter must be 4 strengths >= 0 (brightness, contrast, saturation, "
                f"hue <= 0.5), got {list(color_jitter)}"
            )
        sigma = _pair(blur_sigma, "augment.blur_sigma")
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"augment.blur_sigma must satisfy 0 < low <= high, got {list(blur_sigma)}")
        self.color_jitter, self.blur_sigma = tuple(jitter), sigma
        self.color_jitter_p = _probability("color_jitter_p", color_jitter_p)
        self.grayscale_p = _probability("grayscale_p", grayscale_p)
        self.blur_p = _probability("blur_p", blur_p)
        self.solarize_p = _probability("solarize_p", solarize_p)
        steps = []
        if self.color_jitter_p:
            steps.append(T.RandomApply([T.ColorJitter(*self.color_jitter)], p=self.color_jitter_p))
        if self.grayscale_p:
            steps.append(T.RandomGrayscale(p=self.grayscale_p))
        if self.blur_p:
            kernel = 2 * math.ceil(3 * sigma[1]) + 1  # covers +-3 sigma of the widest blur
            steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=sigma)], p=self.blur_p))
        if self.solarize_p:
            steps.append(T.RandomSolarize(threshold=128, p=self.solarize_p))
        self.steps = T.Compose(steps)

    @property
    def enabled(self) -> bool:
        return bool(self.steps.transforms)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.steps(image)


class MultiViewTransform:
    """k random resized crops of one image, plus the clean enclosing crop the EMA encoder scores.

    Returns a dict with
      - ``images``: ``[k, 3, S, S]`` floats in [0, 1], each view an independent RandomResizedCrop of the
        original image (antialiased, bicubic or bilinear), then its photometric augmentation (`augment`);
      - ``ema_image``: ``[3, E, E]`` floats in [0, 1], the minimal rectangle enclosing all k crops, cut from
        the original image and resized to ``ema_image_size`` (default ``image_size``; A-CLIP-eff uses
        half), with no photometric augmentation (the teacher sees the clean image);
      - ``boxes``: ``[k, 4]`` float32, view v's ``(x0, y0, x1, y1)`` inside the enclosing crop, normalised
        to [0, 1] by its width (x, horizontal) and height (y, vertical).

    Because the enclosing crop covers every view, one EMA forward pass yields a score map from which
    each view's patch scores are read by interpolation over its box; the crops are integer pixel
    rectangles, so the boxes are exact (with k = 1 the box is (0, 0, 1, 1)). The vision tower normalises
    the pixels on its device. Randomness comes from torch's global RNG, as in torchvision (seeded per
    worker by Lightning).
    """

    def __init__(
        self,
        image_size: int,
        num_views: int = 1,
        crop_scale: Sequence[float] = (0.5, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        ema_image_size: int | None = None,
        augment: PhotometricAugment | Mapping[str, Any] | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if int(num_views) < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        low, high = _pair(crop_scale, "crop_scale")
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
        ratio_low, ratio_high = _pair(crop_ratio, "crop_ratio")
        if not 0 < ratio_low <= ratio_high:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {tuple(crop_ratio)}")
        if ema_image_size is None:
            ema_image_size = image_size
        if int(ema_image_size) < 1:
            raise ValueError(f"ema_image_size must be >= 1, got {ema_image_size}")

        self.image_size = int(image_size)
        self.num_views = int(num_views)
        self.crop_scale = (low, high)
        self.crop_ratio = (ratio_low, ratio_high)
        self.ema_image_size = int(ema_image_size)
        if not isinstance(augment, PhotometricAugment):
            augment = PhotometricAugment(**(augment or {}))
        self.augment = augment
        self.interpolation = _interpolation(interpolation)

    def _crop(
        self, image: Image.Image, top: int, left: int, height: int, width: int, size: int
    ) -> Image.Image:
        return F.resized_crop(
            image, top, left, height, width, [size, size], self.interpolation, antialias=True
        )

    def __call__(self, image: Image.Image) -> dict[str, Tensor]:
        crops = [
            T.RandomResizedCrop.get_params(image, list(self.crop_scale), list(self.crop_ratio))
            for _ in range(self.num_views)
        ]  # (top, left, height, width) in the original image's pixels
        top = min(c[0] for c in crops)
        left = min(c[1] for c in crops)
        bottom = max(c[0] + c[2] for c in crops)
        right = max(c[1] + c[3] for c in crops)
        height, width = bottom - top, right - left

        views = [F.to_tensor(self.augment(self._crop(image, *crop, self.image_size))) for crop in crops]
        ema_image = F.to_tensor(self._crop(image, top, left, height, width, self.ema_image_size))
        boxes = torch.tensor(
            [
                [
                    (c_left - left) / width,
                    (c_top - top) / height,
                    (c_left + c_w - left) / width,
                    (c_top + c_h - top) / height,
                ]
                for c_top, c_left, c_h, c_w in crops
            ],
            dtype=torch.float32,
        )
        return {"images": torch.stack(views), "ema_image": ema_image, "boxes": boxes}
