"""Token-reduction policies: which patch tokens the online image encoder sees.

Every policy implements `select(scores, grid, batch)` and returns a LongTensor [batch, n_keep] of
row-major patch indices over the (gh, gw) patch grid (CLS excluded), sorted ascending and unique.

Policies (config name in `conf/masking/`, source):
- `none`: keep every patch (plain CLIP).
- `random` (FLIP): a uniform random subset per sample.
- `grid` (CLIPA): one patch per window x window window (2x2: a quarter of the patches), at a random
  position per window and sample, or always the top-left one (`fixed`).
- `block` (CLIPA): one contiguous, nearly square rectangle at a random position per sample.
- `resize` (CLIPA): drops no token; the views are downsampled (`image_size`) before the encoder.
- `attentive_low` / `attentive_high` / `attentive_mixed` (A-CLIP): keep the cells the EMA encoder's CLS
  attends to most (`low`: discard the lowest scores; the paper's default), least (`high`), or the top
  `top_ratio` share of all cells plus a random fill of the remaining budget (`mixed`).

Decisions are made on `unit` x `unit` cells of patches (unit 2 = 32 px at patch size 16, the paper's
better mask unit); a kept cell keeps all its patches and an attentive cell's score is the mean of its
patches' scores. The number of kept cells is round(keep_ratio * cells), rounded half up, at least 1.
The patch grid must be divisible by `unit` (image sizes that are multiples of unit * patch_size);
other grids raise a ValueError rather than guess at ragged border cells.

Randomness comes only from the `generator` passed to `select` (the global RNG when None), and every
operation is vectorised over the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import roi_align

from aclip.specs import build, class_path

Device = torch.device | str | None
# Class path -> policy class, for every subclass of TokenMasking defined in this process.
POLICIES: dict[str, type[TokenMasking]] = {}


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def _check_ratio(name: str, value: float, *, allow_zero: bool = False) -> float:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or not (0 <= value <= 1) or (value == 0 and not allow_zero):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even; a half cell is always kept here.
    return math.floor(x + 0.5)


def _cell_grid(grid: tuple[int, int], unit: int) -> tuple[int, int]:
    """The (rows, cols) of unit x unit cells covering `grid`; raises if `unit` does not divide it."""
    gh, gw = grid
    if gh % unit or gw % unit:
        raise ValueError(
            f"patch grid {tuple(grid)} is not divisible by the mask unit {unit}: use image sizes whose "
            f"patch grid sides are multiples of {unit} (image side = a multiple of {unit} * patch_size), "
            f"or unit=1"
        )
    return gh // unit, gw // unit


def _resolve_device(scores: Tensor | None, device: Device, generator: torch.Generator | None) -> torch.device:
    if scores is not None:
        return scores.device
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _top_k_sorted(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row of `values` [B, n], sorted ascending: [B, k]."""
    return values.topk(k, dim=1).indices.sort(dim=1).values


def _random_keys(batch: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(batch, n, generator=generator, device=device)


def _random_subset(
    batch: int, n: int, k: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """A uniform random k-subset of range(n) per row, sorted ascending: [batch, k]."""
    return _top_k_sorted(_random_keys(batch, n, generator, device), k)


def _cells_to_patches(cell_idx: Tensor, grid: tuple[int, int], unit: int) -> Tensor:
    """Row-major cell indices [B, k] on the unit-cell grid to the sorted patch indices [B, k * unit^2]."""
    if unit > 1:
        gw = grid[1]
        row, col = cell_idx.div(gw // unit, rounding_mode="floor"), cell_idx % (gw // unit)
        offset = torch.arange(unit, device=cell_idx.device)
        rows = (row * unit)[..., None, None] + offset[:, None]  # [B, k, unit, 1]
        cols = (col * unit)[..., None, None] + offset[None, :]  # [B, k, 1, unit]
        cell_idx = (rows * gw + cols).flatten(1)
    return cell_idx.sort(dim=1).values


def _cell_scores(scores: Tensor, grid: tuple[int, int], unit: int) -> Tensor:
    """Mean patch score of each unit x unit cell: [B, gh * gw] -> [B, cells]."""
    scores = scores.float()
    if unit == 1:
        return scores
    gh, gw = grid
    return scores.reshape(-1, gh // unit, unit, gw // unit, unit).mean(dim=(2, 4)).flatten(1)


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
    out_h, out_w = (_check_positive_int("grid side", side) for side in grid)

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


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------


class TokenMasking:
    """Base class of the policies.

    `needs_scores`: `select` reads the EMA attention scores. `resizes`: the policy drops no tokens but the
    views must be downsampled first (see `ResizeMasking.image_size`).

    Every subclass is registered by its class path (`POLICIES`), the only classes that `build_policy`
    makes from a description such as a checkpoint's hyper-parameters.
    """

    needs_scores: bool = False
    resizes: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            POLICIES[class_path(cls)] = cls

    def num_keep(self, grid: tuple[int, int]) -> int:
        """Number of patch indices `select` returns for a (gh, gw) patch grid."""
        raise NotImplementedError

    def select(
        self,
        scores: Tensor | None,
        grid: tuple[int, int],
        batch: int,
        *,
        device: Device = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Kept patch indices [batch, n_keep], row-major over `grid`, sorted ascending, CLS excluded.

        `scores` [batch, gh * gw] (higher = more attended) is read only when `needs_scores`. Tensors are
        created on `scores.device` when scores are given, else on `device` (else the generator's device).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class NoMasking(TokenMasking):
    """Keep every patch: plain CLIP."""

    def num_keep(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]

    def select(
        self,
        scores: Tensor | None,
        grid: tuple[int, int],
        batch: int,
        *,
        device: Device = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        num_patches = grid[0] * grid[1]
        device = _resolve_device(scores, device, generator)
        return torch.arange(num_patches, device=device).expand(batch, num_patches)


class ResizeMasking(NoMasking):
    """CLIPA `resize`: keep every token of a lower-resolution view (views downsampled by `scale`).

    `select` returns all indices of the (already smaller) grid it is given.
    """

    resizes = True

    def __init__(self, scale: float = 0.5) -> None:
        self.scale = _check_ratio("scale", scale)

    def image_size(self, size: int, patch_size: int = 16) -> int:
        """`size * scale` rounded (half up) to a multiple of `patch_size`, at least one patch."""
        size = _check_positive_int("size", size)
        patch_size = _check_positive_int("patch_size", patch_size)
        return max(1, _round_half_up(size * self.scale / patch_size)) * patch_size


class _CellMasking(TokenMasking):
    """A policy deciding on unit x unit cells: subclasses pick cell indices in `_select_cells`."""

    def __init__(self, keep_ratio: float = 0.5, unit: int = 1) -> None:
        self.keep_ratio = _check_ratio("keep_ratio", keep_ratio)
        self.unit = _check_positive_int("unit", unit)

    def _num_kept_cells(self, cells: tuple[int, int]) -> int:
        return max(1, _round_half_up(self.keep_ratio * cells[0] * cells[1]))

    def num_keep(self, grid: tuple[int, int]) -> int:
        return self._num_kept_cells(_cell_grid(grid, self.unit)) * self.unit**2

    def _select_cells(
        self,
        scores: Tensor | None,
        cells: tuple[int, int],
        batch: int,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> Tensor:
        raise NotImplementedError

    def select(
        self,
        scores: Tensor | None,
        grid: tuple[int, int],
        batch: int,
        *,
        device: Device = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        cells = _cell_grid(grid, self.unit)
        device = _resolve_device(scores, device, generator)
        cell_idx = self._select_cells(scores, cells, batch, device, generator)
        return _cells_to_patches(cell_idx, grid, self.unit)


class RandomMasking(_CellMasking):
    """FLIP: keep a uniform random subset of `keep_ratio` of the cells, independently per sample."""

    def _select_cells(self, scores, cells, batch, device, generator):
        n = cells[0] * cells[1]
        return _random_subset(batch, n, self._num_kept_cells(cells), generator, device)


class GridMasking(_CellMasking):
    """CLIPA `grid`: keep one cell in each `window` x `window` window (keep ratio 1 / window^2).

    The kept position is random per window and per sample, or always the top-left (`fixed`). When the grid
    sides are not multiples of `window`, the ragged border windows keep one of the cells they do contain.
    """

    def __init__(self, window: int = 2, fixed: bool = False, unit: int = 1) -> None:
        self.window = _check_positive_int("window", window)
        super().__init__(keep_ratio=1 / self.window**2, unit=unit)
        self.fixed = bool(fixed)

    def _num_kept_cells(self, cells: tuple[int, int]) -> int:
        return math.ceil(cells[0] / self.window) * math.ceil(cells[1] / self.window)

    def _select_cells(self, scores, cells, batch, device, generator):
        (ch, cw), w = cells, self.window
        top = torch.arange(0, ch, w, device=device)[:, None]  # [nh, 1] first row of each window
        left = torch.arange(0, cw, w, device=device)[None, :]  # [1, nw]
        if self.fixed:
            rows, cols = top.expand(batch, -1, left.shape[1]), left
        else:
            heights, widths = (ch - top).clamp_max(w), (cw - left).clamp_max(w)  # smaller on the border

            def offset(extent: Tensor) -> Tensor:
                keys = torch.rand(batch, top.shape[0], left.shape[1], generator=generator, device=device)
                # floor(u * extent) is uniform over the cells the window has; clamp guards float rounding.
                return (keys * extent).long().minimum(extent - 1)

            rows, cols = top + offset(heights), left + offset(widths)
        return (rows * cw + cols).flatten(1)


@functools.lru_cache(maxsize=256)
def _block_shape(cells: tuple[int, int], target: int) -> tuple[int, int]:
    """(h, w) of the nearly square rectangle inside `cells` whose area is closest to `target`.

    Nearly square: the long side is at most twice the short one (or the grid's own aspect ratio, if that is
    larger). Ties go to the squarer shape, then the smaller area, then the wider one.
    """
    ch, cw = cells
    max_aspect = max(2.0, max(ch, cw) / min(ch, cw))
    shapes = [
        (h, w) for h in range(1, ch + 1) for w in range(1, cw + 1) if max(h, w) <= max_aspect * min(h, w)
    ]
    return min(shapes, key=lambda s: (abs(s[0] * s[1] - target), max(s) / min(s), s[0] * s[1], s[0]))


class BlockMasking(_CellMasking):
    """CLIPA `block`: keep one contiguous rectangle of about `keep_ratio` of the cells, at a uniformly random
    position per sample. The rectangle's shape is `_block_shape`; `num_keep` is its exact area."""

    def _num_kept_cells(self, cells: tuple[int, int]) -> int:
        h, w = _block_shape(cells, super()._num_kept_cells(cells))
        return h * w

    def _select_cells(self, scores, cells, batch, device, generator):
        ch, cw = cells
        h, w = _block_shape(cells, super()._num_kept_cells(cells))
        y0 = torch.randint(ch - h + 1, (batch, 1, 1), generator=generator, device=device)
        x0 = torch.randint(cw - w + 1, (batch, 1, 1), generator=generator, device=device)
        rows = y0 + torch.arange(h, device=device)[:, None]
        cols = x0 + torch.arange(w, device=device)[None, :]
        return (rows * cw + cols).flatten(1)


def _check_layers(layers: str | Sequence[int]) -> str | list[int]:
    if layers in ("all", "last"):
        return layers
    if (
        isinstance(layers, Sequence)
        and not isinstance(layers, str)
        and len(layers) > 0
        and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        return list(layers)
    raise ValueError(
        f'layers must be "all", "last" or a non-empty list of block indices (ints), got {layers!r}'
    )


class AttentiveMasking(_CellMasking):
    """A-CLIP: keep cells by the EMA encoder's CLS-attention scores (a cell's score: its patches' mean).

    strategy: "low" discards the lowest scores, i.e. keeps the `keep_ratio` highest-scoring cells (the
        paper's default); "high" discards the highest, keeping the lowest; "mixed" keeps the `top_ratio`
        share of ALL cells with the highest scores and fills the rest of the budget uniformly at random
        from the other cells (0 <= top_ratio <= keep_ratio; top_ratio is ignored by low and high).
    layers: which blocks' attention the vision tower averages ("all", "last" or a list of block indices);
        read by the tower, not by `select`.
    """

    needs_scores = True
    STRATEGIES = ("low", "high", "mixed")

    def __init__(
        self,
        strategy: str = "low",
        keep_ratio: float = 0.5,
        unit: int = 1,
        top_ratio: float = 0.25,
        layers: str | Sequence[int] = "all",
    ) -> None:
        super().__init__(keep_ratio=keep_ratio, unit=unit)
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy must be one of {self.STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.top_ratio = _check_ratio("top_ratio", top_ratio, allow_zero=True)
        if strategy == "mixed" and self.top_ratio > self.keep_ratio:
            raise ValueError(
                f"top_ratio must be in [0, keep_ratio={self.keep_ratio}] for strategy 'mixed', "
                f"got {top_ratio}"
            )
        self.layers = _check_layers(layers)

    def select(
        self,
        scores: Tensor | None,
        grid: tuple[int, int],
        batch: int,
        *,
        device: Device = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        expected = (batch, grid[0] * grid[1])
        if scores is None:
            raise ValueError(f"{type(self).__name__} needs attention scores of shape {expected}, got None")
        if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(
                f"scores must have shape [batch, gh * gw] = {expected} for grid {grid}, got {shape}"
            )
        return super().select(scores, grid, batch, device=device, generator=generator)

    def _select_cells(self, scores, cells, batch, device, generator):
        unit = self.unit
        values = _cell_scores(scores, (cells[0] * unit, cells[1] * unit), unit)
        n_keep = self._num_kept_cells(cells)
        if self.strategy == "low":
            return _top_k_sorted(values, n_keep)
        if self.strategy == "high":
            return _top_k_sorted(-values, n_keep)
        # mixed: the top cells get a key above any random key in [0, 1), so they are always kept.
        n_top = _round_half_up(self.top_ratio * cells[0] * cells[1])
        keys = _random_keys(batch, values.shape[1], generator, device)
        keys.scatter_(1, values.topk(n_top, dim=1).indices, 2.0)
        return _top_k_sorted(keys, n_keep)


def build_policy(spec: Mapping[str, Any] | None) -> TokenMasking:
    """The policy a `masking` description names (None or empty: keep every token), from `POLICIES` only."""
    return build(spec, POLICIES, "masking") if spec else NoMasking()
