"""Image transforms for training views and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as F


def _to_normalised_tensor() -> list:
    return [T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]


def eval_transform(image_size: int) -> T.Compose:
    """Resize the short side, centre-crop, normalise with CLIP's statistics."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            *_to_normalised_tensor(),
        ]
    )


def _pair(value: Sequence[float], name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a pair of numbers (low, high), got {value!r}") from error
    return low, high


class MultiViewTransform:
    """k random resized crops of one image, plus the clean enclosing crop the EMA encoder scores.

    Returns a dict with
      - ``images``: ``[k, 3, S, S]``, each view an independent RandomResizedCrop of the original image
        (bicubic, antialiased), with optional colour jitter and Gaussian blur, CLIP-normalised;
      - ``ema_image``: ``[3, E, E]``, the minimal rectangle enclosing all k crops, cut from the original
        image and resized to ``ema_image_size`` (default ``image_size``; A-CLIP-eff uses half), with no
        colour augmentation (the teacher sees the clean image), CLIP-normalised;
      - ``boxes``: ``[k, 4]`` float32, view v's ``(x0, y0, x1, y1)`` inside the enclosing crop, normalised
        to [0, 1] by its width (x, horizontal) and height (y, vertical).

    Because the enclosing crop covers every view, one EMA forward pass yields a score map from which
    each view's patch scores are read by interpolation over its box; the crops are integer pixel
    rectangles, so the boxes are exact (with k = 1 the box is (0, 0, 1, 1)).
    Randomness comes from torch's global RNG, as in torchvision (seeded per worker by Lightning).
    """

    def __init__(
        self,
        image_size: int,
        num_views: int = 1,
        crop_scale: Sequence[float] = (0.5, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        ema_image_size: int | None = None,
        color_jitter: float = 0.0,
        blur: float = 0.0,
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
        if not color_jitter >= 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        if not 0 <= blur <= 1:
            raise ValueError(f"blur is a probability and must be in [0, 1], got {blur}")

        self.image_size = int(image_size)
        self.num_views = int(num_views)
        self.crop_scale = (low, high)
        self.crop_ratio = (ratio_low, ratio_high)
        self.ema_image_size = int(ema_image_size)
        self.color_jitter = float(color_jitter)
        self.blur = float(blur)

        augment = []
        if self.color_jitter > 0:
            s = self.color_jitter
            augment.append(T.RandomApply([T.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s)], p=0.8))
        if self.blur > 0:
            kernel = max(1, round(0.1 * self.image_size)) | 1  # odd, about 10% of the side
            augment.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=self.blur))
        self.view_augment = T.Compose([*augment, *_to_normalised_tensor()])
        self.normalise = T.Compose(_to_normalised_tensor())

    @staticmethod
    def _crop(image: Image.Image, top: int, left: int, height: int, width: int, size: int) -> Image.Image:
        return F.resized_crop(
            image, top, left, height, width, [size, size], T.InterpolationMode.BICUBIC, antialias=True
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

        views = [self.view_augment(self._crop(image, *crop, self.image_size)) for crop in crops]
        ema_image = self.normalise(self._crop(image, top, left, height, width, self.ema_image_size))
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
