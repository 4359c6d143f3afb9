"""Splitting evaluation work over the ranks of a process group and putting the results back in order.

Rank r of W handles items r, r + W, r + 2W, ... (no padding, no duplicates), so gathered results are
exactly those of one process, whatever the world size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from aclip.distributed import rank_and_world

T = TypeVar("T")


def my_share(items: Sequence[T]) -> Sequence[T]:
    """The items this rank handles: every world-size-th one, starting at its rank."""
    rank, world = rank_and_world()
    return items[rank::world]


class RankShareSampler(DistributedSampler):
    """The indices of `my_share` of a dataset, in order: no padding, no duplicates.

    A `DistributedSampler`, so that Lightning keeps it under DDP instead of injecting its own (which pads
    the shares to equal length with repeated items).
    """

    def __init__(self, dataset: Dataset) -> None:
        rank, world = rank_and_world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def gather_in_order(local: Tensor, total: int) -> Tensor:
    """Rows computed by every rank on `my_share` of `total` items, back in item order on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return local
    capacity = -(-total // world)  # the largest share
    padded = local.new_zeros((capacity, *local.shape[1:]))
    padded[: local.shape[0]] = local
    shares = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shares, padded)
    # Row j of rank r's share is item j * world + r: stacking on dim 1 and flattening interleaves them.
    return torch.stack(shares, dim=1).flatten(0, 1)[:total]
