"""A training DataLoader that can resume part way through an epoch, in the order it would have read.

Lightning saves the `state_dict` of a training dataloader that has one in every checkpoint (the fit
loop's `combined_loader` state) and hands it back to `load_state_dict` on resume, before the first batch
is drawn. `ResumableDataLoader` records there the epoch and how many batches of it were handed out; its
order is a function of (seed, epoch) alone (`EpochShuffleSampler`), so the resumed run skips exactly the
batches already trained on, without loading them, and reads the rest in the original order.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from aclip.distributed import rank_and_world


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a map-style dataset, shuffled by (seed, epoch), optionally starting part way.

    A `DistributedSampler` whose replicas are the ranks of the default process group (one without a
    group), so Lightning keeps it under DDP instead of injecting its own. Lightning sets the epoch
    (`set_epoch`); `start` drops that many indices from the front of the next pass.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True) -> None:
        rank, world = rank_and_world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)


class ResumableDataLoader(DataLoader):
    """A shuffling DataLoader over a map-style dataset whose position in the epoch survives a checkpoint.

    Takes DataLoader's arguments; without a `sampler` it reads an `EpochShuffleSampler` seeded by `seed`
    (default: the seed of `seed_everything`, as Lightning's own distributed sampler). Worker seeds come
    from a generator reseeded every epoch, so loading never draws from the global random state.

    With `num_workers > 0` the data order after a mid-epoch resume is the same, but the random
    augmentations of the rest of that epoch differ: the workers restart their random streams.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        shuffle: bool = True,
        sampler: Any = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError("ResumableDataLoader needs a map-style dataset, not an IterableDataset")
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        if sampler is None:
            sampler = EpochShuffleSampler(dataset, seed=self.seed, shuffle=shuffle)
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch: int | None = None  # the epoch of the current pass, once started
        self._handed_out = 0  # batches of that epoch handed to training, skipped ones included
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: the pass (and the workers' prefetching) starts at the first batch requested, after
        # Lightning has set this epoch on the sampler.
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self._take_resume(epoch)
        if self._resumable:
            self.sampler.start = skip * (self.batch_size or 1)
        self.generator.manual_seed(self.seed + 1_000_003 * (epoch + 1))
        self._epoch, self._handed_out = epoch, skip
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def _take_resume(self, epoch: int) -> int:
        """Batches to skip in this pass: those of a restored position in this same epoch (used once)."""
        state, self._resume = self._resume, None
        if not self._resumable or not state or state["epoch"] != epoch or state["batches"] >= len(self):
            return 0  # a fresh epoch, or a checkpoint written at the end of the previous one
        return state["batches"]

    @property
    def _resumable(self) -> bool:
        """Only the own sampler can start part way (Lightning swaps in a sequential one to overfit)."""
        return isinstance(self.sampler, EpochShuffleSampler)

    def rewind(self, batches: int = 1) -> None:
        """Count `batches` handed-out batches as unread, e.g. one interrupted before its step finished."""
        self._handed_out = max(0, self._handed_out - batches)

    def state_dict(self) -> dict[str, int]:
        if self._resume is not None:  # restored but not started yet: keep the restored position
            return dict(self._resume)
        if self._epoch is None or not self._resumable:
            return {}
        return {
            "epoch": self._epoch,
            "batches": self._handed_out,
            "batch_size": self.batch_size or 1,
            "num_samples": len(self.sampler),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict:
            return
        expected = {"batch_size": self.batch_size or 1, "num_samples": len(self.sampler)}
        saved = {key: state_dict.get(key) for key in expected}
        if saved != expected:
            rank_zero_warn(
                f"the checkpoint's training data position was saved with {saved}, this run has {expected}; "
                "the interrupted epoch restarts from its beginning"
            )
            return
        self._resume = dict(state_dict)
