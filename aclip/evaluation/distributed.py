"""Splitting evaluation work over the ranks of a process group and putting the results back in order.

Rank r of W handles items r, r + W, r + 2W, ... (no padding, no duplicates), so gathered results are
exactly those of one process, whatever the world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from aclip.distributed import rank_and_world

T = TypeVar("T")


def my_share(items: Sequence[T]) -> Sequence[T]:
    """The items this rank handles: every world-size-th one, starting at its rank."""
    rank, world = rank_and_world()
    return items[rank::world]


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
