"""Loading evaluation images: resized and centre-cropped for the model, each rank its share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from aclip.datamodules.transforms import EvalTransform
from aclip.evaluation.distributed import RankShareSampler


class TransformedImages(Dataset):
    """Applies an image transform to the images of an evaluation set, passing labels through."""

    def __init__(
        self, source: Dataset, transform: Callable[[Image.Image | torch.Tensor], torch.Tensor]
    ) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        item = self.source[index]
        if isinstance(item, tuple):
            image, *rest = item
            return (self.transform(image), *rest)
        return self.transform(item)


class EvalLoaders:
    """Makes the dataloader over this rank's share (`RankShareSampler`) of an evaluation set, in item order.

    Args:
        image_size: side of the square images the model sees (the shorter side is resized to it, then
            centre-cropped).
        batch_size: images per batch on each device.
        num_workers: dataloader worker processes per device.
        interpolation: the resize's filter, "bicubic" or "bilinear".
    """

    def __init__(
        self, image_size: int, batch_size: int = 256, num_workers: int = 4, interpolation: str = "bicubic"
    ) -> None:
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                "need evaluation.loader.image_size >= 1, evaluation.loader.batch_size >= 1 and "
                f"evaluation.loader.num_workers >= 0; got {image_size}, {batch_size}, {num_workers}"
            )
        self.transform = EvalTransform(image_size, interpolation)
        self.batch_size, self.num_workers = batch_size, num_workers

    def __call__(self, dataset: Dataset) -> DataLoader:
        images = TransformedImages(dataset, self.transform)
        return DataLoader(
            images,
            sampler=RankShareSampler(images),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
