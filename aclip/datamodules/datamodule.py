"""The LightningDataModule: image-caption training pairs, from any source, as multi-view training batches."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from aclip.datamodules.images import BadSample, skip_record
from aclip.datamodules.sampling import ResumableDataLoader
from aclip.datamodules.transforms import MultiViewTransform
from aclip.distributed import per_device_batch_size
from aclip.tokenizer import TextReduction, Truncate

if TYPE_CHECKING:
    from aclip.evaluation.suite import Evaluation


@runtime_checkable
class StreamingSource(Protocol):
    """A training source read as a stream (e.g. webdataset shards) that batches in its dataloader workers.

    `batches` returns an iterable dataset of this rank's collated batches of `prepare(image, caption)`
    samples (each with the `skip_record` fields), with `__len__` = batches per epoch on every rank.
    """

    def batches(
        self,
        prepare: Callable[[Image.Image, str], dict[str, Tensor]],
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
    ) -> IterableDataset: ...


class ImageTextDataset(Dataset):
    """Turns a map-style source of (image, caption) pairs into training samples (`prepare`). An item may
    carry a third element, a dict of extras that `prepare` receives (e.g. the built-in data's
    `object_mask`).

    A pair the source cannot provide (it raises :class:`BadSample`) is replaced by the next good one. The
    sample records (`skip_record`) whether its own index was bad, and only that: each index is read once
    an epoch, so every bad pair is counted exactly once, at its own index, and the bad ones passed over on
    the way to a substitute are not counted again. After `max_consecutive_bad` bad pairs in a row the
    source is assumed broken (e.g. a wrong image root) and an error is raised.
    """

    def __init__(
        self,
        source: Dataset,
        prepare: Callable[[Image.Image, str], dict[str, Tensor]],
        max_consecutive_bad: int = 64,
    ) -> None:
        self.source, self.prepare, self.max_consecutive_bad = source, prepare, max_consecutive_bad

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[BadSample] = []
        while len(skipped) < min(self.max_consecutive_bad, len(self)):
            try:  # a source opens an image, `prepare` decodes it: either may find it unusable
                sample = self.prepare(*self.source[(index + len(skipped)) % len(self)])
            except BadSample as bad:
                skipped.append(bad)
                continue
            return {**sample, **skip_record(skipped[:1])}
        examples = "\n  ".join(str(bad) for bad in skipped[:5])
        raise RuntimeError(
            f"{len(skipped)} consecutive samples from index {index} could not be read, e.g.\n  {examples}\n"
            "check the data paths (data.train.*) and that the files are readable"
        )


class ClipDataModule(pl.LightningDataModule):
    """Image-text training data: map-style sources (with bad samples skipped) or streaming ones.

    Args:
        train: a dataset of (PIL image, caption) pairs raising `BadSample` for unusable ones, or a
            `StreamingSource`.
        batch_size: global training batch, split evenly over all devices of all nodes.
        num_workers: dataloader worker processes per device.
        image_size: side of the square training views.
        num_views: random resized crops per training image (A-CLIP: 2).
        ema_image_size: side of the EMA teacher's enclosing crop (default `image_size`; A-CLIP-eff: half).
        text_masking: how the training captions are cut (a `TextReduction`: CLIPA's text token
            reduction); None: `Truncate()`, 77 tokens.
        crop_scale: area range of the random resized crop of a training view.
        augment: the photometric augmentation of the views (`PhotometricAugment`'s arguments); None: none.
        interpolation: the crops' resampling filter, "bicubic" or "bilinear".
        evaluation: the evaluation suite whose image sets are the validation dataloaders (the learning
            curves during training); None: no validation.
    """

    def __init__(
        self,
        train: Dataset,
        batch_size: int = 256,
        num_workers: int = 2,
        image_size: int = 224,
        num_views: int = 1,
        ema_image_size: int | None = None,
        text_masking: TextReduction | None = None,
        crop_scale: Sequence[float] = (0.5, 1.0),
        augment: Mapping[str, Any] | None = None,
        interpolation: str = "bicubic",
        evaluation: Evaluation | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"need data.batch_size >= 1 and data.num_workers >= 0; got {batch_size}, {num_workers}"
            )
        self.train_source = train
        self.evaluation = evaluation
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tokenizer = (text_masking or Truncate()).tokenizer()
        self.view_transform = MultiViewTransform(
            image_size,
            num_views=num_views,
            crop_scale=crop_scale,
            ema_image_size=ema_image_size,
            augment=augment,
            interpolation=interpolation,
        )

    def setup(self, stage: str) -> None:
        # The teacher's crop is rendered only for models that read it (attentive masking, BYOL).
        module = self.trainer.lightning_module if self.trainer is not None else None
        if stage == "fit" and module is not None and hasattr(module, "needs_teacher_crop"):
            self.view_transform.teacher_crop = module.needs_teacher_crop
        # Every rank was seeded alike (identical model init), and Lightning re-seeds alike when it sets up
        # the process group. Views cropped in the main process (num_workers=0) must differ per rank, so
        # the global generators get a per-rank seed here; dataloader workers are seeded per rank anyway.
        # The samplers' shuffles have generators of their own and stay the same on every rank.
        if stage == "fit" and self.trainer is not None and self.trainer.world_size > 1:
            entropy = [torch.initial_seed(), self.trainer.global_rank]
            seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)

    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        return per_device_batch_size(self.batch_size, world)

    def prepare_pair(
        self, image: Image.Image | Tensor, caption: str, extras: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """A training sample from a source's item: an opened image (or its pixels), its caption and
        optional `extras`. The views (`MultiViewTransform`, which decodes the image) and the caption
        tokens; an `object_mask` among the extras (the built-in data's) is cut with the views."""
        object_mask = (extras or {}).get("object_mask")
        return {**self.view_transform(image, object_mask), "text": self.tokenizer(caption)[0]}

    def train_dataloader(self) -> DataLoader:
        batch_size = self.per_device_batch_size()
        if isinstance(self.train_source, StreamingSource):
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            batches = self.train_source.batches(self.prepare_pair, batch_size, rank, world, self.num_workers)
            return self._loader(batches, batch_size=None, persistent=True)
        if len(self.train_source) < batch_size:
            raise ValueError(
                f"the training set has {len(self.train_source)} samples, fewer than one per-device batch "
                f"({batch_size}); lower data.batch_size or use more data"
            )
        dataset = ImageTextDataset(self.train_source, self.prepare_pair)
        # drop_last: every rank needs equal batches for the gathered contrastive loss.
        return self._loader(dataset, batch_size, shuffle=True, drop_last=True, persistent=True)

    def val_dataloader(self) -> list[DataLoader]:
        """This rank's share of every evaluation image set (`Evaluation.dataloaders`), if any."""
        return self.evaluation.dataloaders() if self.evaluation is not None else []

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int | None,
        shuffle: bool = False,
        drop_last: bool = False,
        persistent: bool = False,
    ) -> DataLoader:
        # A shuffled map-style loader can resume mid-epoch at the batch it stopped at.
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0 and persistent,
        )
