"""Token-reduction policies: which patch tokens the online image encoder sees.

Every policy implements `select(scores, grid, batch)` and returns a LongTensor [batch, n_keep] of
row-major patch indices (CLS excluded), sorted ascending.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TokenMasking:
    """Base class of the policies. `needs_scores` says whether `select` reads the EMA attention scores."""

    needs_scores: bool = False

    def select(
        self,
        scores: Tensor | None,
        grid: tuple[int, int],
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        raise NotImplementedError


class NoMasking(TokenMasking):
    """Keep every patch: plain CLIP."""

    def select(
        self,
        scores: Tensor | None,
        grid: tuple[int, int],
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        num_patches = grid[0] * grid[1]
        return torch.arange(num_patches, device=device).expand(batch, num_patches)
