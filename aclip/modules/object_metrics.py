"""Does the masking find the object? Diagnostics from the object masks the built-in data knows.

The built-in dataset draws its captioned objects itself, so it can hand each sample the share of every
pixel they cover (`data.train.object_masks`). The views and the teacher's crop carry that mask cut and
resized with their pixels (`object_masks` [B, k, S, S], `ema_object_mask` [B, E, E], uint8, 255: fully
object). From it, per training step:

- object recall: the share of the object's area (patch coverage summed) that lies in the patches a policy
  keeps. Random masking keeps `keep_ratio` of it on average; a teacher that attends to the object keeps
  more, one that locks onto clutter keeps less.
- object score mass: the share of the teacher's patch scores that falls on the object, against
- object area: the share of the teacher crop's patches the object covers, which is what scores spread
  evenly (or at random) would put on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_coverage(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """How much of each patch the objects cover: masks [N, H, W] (uint8, 255: fully; or float in [0, 1])
    -> [N, gh * gw] in [0, 1], row-major over the patch grid."""
    masks = masks.float() / 255 if masks.dtype == torch.uint8 else masks.float()
    return F.adaptive_avg_pool2d(masks[:, None], grid).flatten(1)


def object_recall(coverage: Tensor, keep: Tensor) -> Tensor:
    """Share of each view's object area in its kept patches: coverage [N, P], keep [N, n_keep] -> [N].

    NaN for a view that shows no object (nothing to recall).
    """
    return coverage.gather(1, keep).sum(1) / coverage.sum(1)


def object_score_mass(scores: Tensor, coverage: Tensor) -> Tensor:
    """Share of each sample's (non-negative) patch score mass on its objects: [N, P], [N, P] -> [N].

    A patch counts with the share of it the objects cover.
    """
    scores = scores.float()
    return (scores * coverage).sum(1) / scores.sum(1).clamp_min(torch.finfo(scores.dtype).tiny)


def object_diagnostics(
    object_masks: Tensor,
    keep: Tensor,
    grid: tuple[int, int],
    score_map: Tensor | None = None,
    ema_object_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The step's object metrics (batch means, views without objects left out): `object_recall` of the
    views [B, k, S, S] and their kept patches [B * k, n_keep] on the views' `grid`; with the teacher's
    `score_map` [B, gh, gw] and its crop's mask [B, E, E], also `object_score_mass` and `object_area`."""
    metrics = {
        "object_recall": object_recall(patch_coverage(object_masks.flatten(0, 1), grid), keep).nanmean()
    }
    if score_map is not None and ema_object_mask is not None:
        coverage = patch_coverage(ema_object_mask, tuple(score_map.shape[-2:]))
        metrics["object_score_mass"] = object_score_mass(score_map.flatten(1), coverage).mean()
        metrics["object_area"] = coverage.mean()
    return metrics
