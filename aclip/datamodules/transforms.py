"""Image transforms for training views and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import Tensor
from torchvision import transforms as T


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


class ViewTransform:
    """One training view: a random resized crop, normalised. Returns {"images": [1, 3, H, W]}."""

    def __init__(self, image_size: int, crop_scale: Sequence[float] = (0.5, 1.0)) -> None:
        low, high = crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(
                    image_size, scale=(low, high), interpolation=T.InterpolationMode.BICUBIC, antialias=True
                ),
                *_to_normalised_tensor(),
            ]
        )

    def __call__(self, image: Image.Image) -> dict[str, Tensor]:
        return {"images": torch.stack([self.transform(image)])}
