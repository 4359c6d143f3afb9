"""Image transforms for training views and evaluation, on uint8 pixel tensors.

Images are decoded once (at a reduced size where every crop allows, `decode_pixels`), cropped and resized
as uint8 tensors (torchvision's antialiased kernels, several times faster than Pillow's), augmented as
uint8, and handed to the model as uint8: the vision tower converts and normalises them on its device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from aclip.datamodules.images import decode_pixels

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
# The largest factor a JPEG is decoded smaller by: Pillow's (libjpeg's) DCT scaling goes to 1/8.
_MAX_REDUCTION = 8

Crop = tuple[int, int, int, int]  # (top, left, height, width) in pixels


def _interpolation(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def as_pixels(image: Image.Image | Tensor) -> Tensor:
    """uint8 RGB pixels [3, H, W] of a decoded or opened PIL image, or of such a tensor (passed through)."""
    return image if isinstance(image, Tensor) else decode_pixels(image)


class EvalTransform:
    """Resize the short side (antialiased), centre-crop: uint8 pixels [3, S, S] (the model normalises)."""

    def __init__(self, image_size: int, interpolation: str = "bicubic") -> None:
        self.image_size, self.interpolation = int(image_size), _interpolation(interpolation)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        pixels = F.resize(as_pixels(image), [self.image_size], self.interpolation, antialias=True)
        return F.center_crop(pixels, [self.image_size])


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
    that order, after the view's crop, on uint8 pixels. All probabilities 0 (the default) apply nothing.

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
        self.steps = T.Compose(steps) if steps else None

    def __call__(self, pixels: Tensor) -> Tensor:
        """An augmented copy of the uint8 pixels [3, H, W] (the same tensor when nothing applies)."""
        return self.steps(pixels) if self.steps is not None else pixels


def _with_mask(pixels: Tensor, mask: Tensor) -> Tensor:
    """Pixels [3, H, W] and a mask [H, W] as the channels of one [4, H, W] uint8 tensor, channels last in
    memory, so that each crop resizes both in one pass (channel for channel what separate resizes give):
    a view where they already are such channels (the built-in renderer draws them so), else a copy."""
    if pixels.dtype != torch.uint8 or pixels.shape[0] != 3:
        raise ValueError(
            f"pixels cut with a mask must be uint8 RGB [3, H, W], got {pixels.dtype} {tuple(pixels.shape)}"
        )
    height, width = pixels.shape[-2:]
    if tuple(mask.shape) != (height, width) or mask.dtype != torch.uint8:
        raise ValueError(
            f"object_mask must be uint8 of the image's size {height} x {width}, got "
            f"{mask.dtype} of {tuple(mask.shape)}"
        )
    interleaved = (1, 4 * width, 4)
    if (
        pixels.stride() == interleaved
        and mask.stride() == interleaved[1:]
        and mask.untyped_storage().data_ptr() == pixels.untyped_storage().data_ptr()
        and mask.storage_offset() == pixels.storage_offset() + 3
    ):
        return pixels.as_strided((4, height, width), interleaved)
    layers = torch.empty(height, width, 4, dtype=torch.uint8)
    layers[..., :3] = pixels.permute(1, 2, 0)
    layers[..., 3] = mask
    return layers.permute(2, 0, 1)


class MultiViewTransform:
    """k random resized crops of one image, plus the clean enclosing crop the EMA encoder scores.

    Takes a PIL image (opened, not yet decoded, is best: see below) or uint8 pixels [3, H, W], and
    returns a dict with
      - ``images``: ``[k, 3, S, S]`` uint8, each view an independent RandomResizedCrop of the original
        image (antialiased, bicubic or bilinear), then its photometric augmentation (`augment`);
      - ``ema_image``: ``[3, E, E]`` uint8, the minimal rectangle enclosing all k crops, cut from the
        original image and resized to ``ema_image_size`` (default ``image_size``; A-CLIP-eff uses half),
        with no photometric augmentation (the teacher sees the clean image). Left out when
        ``teacher_crop`` is false (methods whose masking and losses do not read the teacher);
      - ``boxes``: ``[k, 4]`` float32, view v's ``(x0, y0, x1, y1)`` inside the enclosing crop, normalised
        to [0, 1] by its width (x, horizontal) and height (y, vertical).

    The crops are drawn from the image's size before it is decoded: a JPEG whose every crop is at least
    twice its output size is decoded at a half (a quarter, an eighth) of its size, in the DCT domain.
    Because the enclosing crop covers every view, one EMA forward pass yields a score map from which
    each view's patch scores are read by interpolation over its box; the crops are integer pixel
    rectangles of the original image, so the boxes are exact (with k = 1 the box is (0, 0, 1, 1)). The
    vision tower converts and normalises the pixels on its device. Randomness comes from torch's global
    RNG, as in torchvision (seeded per worker by Lightning).
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
        teacher_crop: bool = True,
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
        self.teacher_crop = bool(teacher_crop)

    def _crops(self, height: int, width: int) -> list[Crop]:
        """The views' crops, drawn as RandomResizedCrop draws them, on an image of that size."""
        dummy = torch.empty(0, height, width)  # get_params reads the size only
        return [
            tuple(RandomResizedCrop.get_params(dummy, list(self.crop_scale), list(self.crop_ratio)))
            for _ in range(self.num_views)
        ]

    def _reduction(self, crops: Sequence[Crop], enclosing: Crop) -> int:
        """The largest power of 2 (at most 8) by which every crop stays at least its output size."""
        sized = [(crop, self.image_size) for crop in crops]
        if self.teacher_crop:
            sized.append((enclosing, self.ema_image_size))
        slack = min(min(crop[2], crop[3]) / size for crop, size in sized)
        reduction = 1
        while reduction * 2 <= min(slack, _MAX_REDUCTION):
            reduction *= 2
        return reduction

    def _resized(self, pixels: Tensor, crop: Crop, scale: tuple[float, float], size: int) -> Tensor:
        """`crop` (in the original image's pixels) cut from `pixels` (decoded at `scale` = (y, x) of that
        size) and resized to size x size."""
        top, left, height, width = crop
        sy, sx = scale
        y0, x0 = round(top * sy), round(left * sx)
        y1, x1 = max(y0 + 1, round((top + height) * sy)), max(x0 + 1, round((left + width) * sx))
        return F.resized_crop(
            pixels, y0, x0, y1 - y0, x1 - x0, [size, size], self.interpolation, antialias=True
        )

    def __call__(self, image: Image.Image | Tensor, object_mask: Tensor | None = None) -> dict[str, Tensor]:
        """The views (see the class) of `image`; with an `object_mask` [H, W] at the image's size (uint8
        coverage of the captioned objects, as the built-in data provides), also each view's and the
        teacher crop's share of it, cut in the same resizes as the pixels: `object_masks` [k, S, S] and
        `ema_object_mask` [E, E], uint8."""
        if isinstance(image, Tensor):
            height, width = image.shape[-2:]
        else:
            width, height = image.size
        crops = self._crops(height, width)
        top = min(c[0] for c in crops)
        left = min(c[1] for c in crops)
        bottom = max(c[0] + c[2] for c in crops)
        right = max(c[1] + c[3] for c in crops)
        enclosing = (top, left, bottom - top, right - left)
        if isinstance(image, Tensor):
            pixels = image
        else:  # with a mask, at full size: the mask is cut in the same resize as the pixels
            reduce = self._reduction(crops, enclosing) if object_mask is None else 1
            pixels = decode_pixels(image, reduce=reduce)
        scale = (pixels.shape[-2] / height, pixels.shape[-1] / width)
        layers = pixels if object_mask is None else _with_mask(pixels, object_mask)

        views = [self._resized(layers, crop, scale, self.image_size) for crop in crops]
        sample = {"images": torch.stack([self.augment(view[:3]) for view in views])}
        teacher = self._resized(layers, enclosing, scale, self.ema_image_size) if self.teacher_crop else None
        if teacher is not None:
            sample["ema_image"] = teacher[:3]
        if object_mask is not None:
            sample["object_masks"] = torch.stack([view[3] for view in views])
            if teacher is not None:
                sample["ema_object_mask"] = teacher[3]
        sample["boxes"] = torch.tensor(
            [
                [
                    (c_left - left) / enclosing[3],
                    (c_top - top) / enclosing[2],
                    (c_left + c_w - left) / enclosing[3],
                    (c_top + c_h - top) / enclosing[2],
                ]
                for c_top, c_left, c_h, c_w in crops
            ],
            dtype=torch.float32,
        )
        return sample
