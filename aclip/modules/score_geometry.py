"""Where the teacher's patch scores land: each view's scores read from the map of the crop that encloses
the views (`map_scores_to_views`), and the share of a sample's score mass its kept patches hold
(`kept_score_mass`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

from aclip.specs import is_integer


def kept_score_mass(scores: Tensor, keep: Tensor) -> Tensor:
    """Share of each sample's score mass that falls in the kept patches: [B, N], [B, n_keep] -> [B].

    `scores` may be unnormalised; it is normalised by its sum per sample (0 where that sum is 0).
    """
    scores = scores.float()
    kept = scores.gather(1, keep).sum(dim=1)
    return kept / scores.sum(dim=1).clamp_min(torch.finfo(scores.dtype).tiny)


def map_scores_to_views(score_map: Tensor, boxes: Tensor, grid: tuple[int, int]) -> Tensor:
    """Read each view's patch scores from the score map of the crop that encloses the views.

    score_map [B, gh, gw]: patch scores of the enclosing EMA crop (row-major patch grid). boxes [B, k, 4]:
    each view's (x0, y0, x1, y1) inside the enclosing crop, normalised to [0, 1]. grid: the views' patch
    grid (gh', gw'). Returns [B * k, gh' * gw'] scores in `score_map`'s dtype, sample-major (row b * k + v
    is view v of sample b), each row row-major over the view's grid.

    Geometry: map cell (i, j) covers the square [j, j + 1] x [i, i + 1] in grid units, so the crop spans
    [0, gw] x [0, gh] and its score field is the bilinear interpolation of the cell values placed at the cell
    centres (j + 0.5, i + 0.5), held constant beyond the outer centres (as `F.interpolate` /
    `F.grid_sample(align_corners=False, padding_mode="border")` do). View patch (r, c) gets the field's
    value at its CENTRE, x = (x0 + (c + 0.5) * (x1 - x0) / gw') * gw and
    y = (y0 + (r + 0.5) * (y1 - y0) / gh') * gh: one point sample per patch, not an average over its area
    (for view patches about the size of the map's cells, as with A-CLIP's enclosing crops, the two barely
    differ). A box reaching more than half a cell outside the crop reads zeros there (roi_align's
    convention); boxes are not range-checked.

    Implementation: one `torchvision.ops.roi_align` call over all B * k boxes with `aligned=True` (box
    coordinates are continuous, the -0.5 shift maps them to cell-centre indices) and `sampling_ratio=1` (one
    bilinear sample at the centre of each output bin = each view patch). roi_align needs float input:
    half/bf16 maps are computed in float32 and cast back.
    """
    if not isinstance(score_map, Tensor) or score_map.dim() != 3:
        shape = tuple(score_map.shape) if isinstance(score_map, Tensor) else type(score_map).__name__
        raise ValueError(f"score_map must be a tensor of shape [B, gh, gw], got {shape}")
    if not score_map.is_floating_point():
        raise ValueError(f"score_map must be a floating-point tensor, got {score_map.dtype}")
    batch, gh, gw = score_map.shape
    if gh < 1 or gw < 1:
        raise ValueError(f"score_map's grid must be non-empty, got shape {tuple(score_map.shape)}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a tensor of shape [B={batch}, k, 4] (x0, y0, x1, y1), got {shape}")
    if not isinstance(grid, Sequence) or isinstance(grid, str) or len(grid) != 2:
        raise ValueError(f"grid must be a pair (gh, gw) of the views' patch grid, got {grid!r}")
    if any(not is_integer(side) or side < 1 for side in grid):
        raise ValueError(f"grid sides must be integers >= 1, got {tuple(grid)!r}")
    out_h, out_w = grid

    num_views = boxes.shape[1]
    compute_dtype = torch.float64 if score_map.dtype == torch.float64 else torch.float32
    device = score_map.device
    if batch * num_views == 0:
        return score_map.new_zeros(batch * num_views, out_h * out_w)
    # Scaled by Python numbers, not a tensor built from a list: that would be a host-to-device copy
    # and, on CUDA, a synchronisation of the stream in the middle of the step.
    x0, y0, x1, y1 = boxes.to(device=device, dtype=compute_dtype).flatten(0, 1).unbind(1)  # [B * k] each
    sample_index = torch.arange(batch, device=device, dtype=compute_dtype)[:, None].expand(-1, num_views)
    # [B * k, 5]: (sample, x0, y0, x1, y1) in grid units
    rois = torch.stack([sample_index.flatten(), x0 * gw, y0 * gh, x1 * gw, y1 * gh], dim=1)
    pooled = roi_align(
        score_map.to(compute_dtype).unsqueeze(1),
        rois,
        output_size=(out_h, out_w),
        spatial_scale=1.0,
        sampling_ratio=1,
        aligned=True,
    )  # [B * k, 1, gh', gw']
    return pooled.flatten(1).to(score_map.dtype)
