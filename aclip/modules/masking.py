"""Token-reduction policies: which patch tokens the online image encoder sees.

A policy is one subclass of `TokenMasking`: it picks cells (`select_cells`), and may read the EMA
teacher's scores (`needs_scores`, over the blocks `layers`) or the views' pixels (`needs_pixels`), keep
a different budget (`num_kept_cells`) or resize the views before the encoder (`prepare_views`,
`view_size`). `select(scores, grid, batch, pixels=...)`, defined once on the base, returns a LongTensor
[batch, n_keep] of row-major patch indices over the (gh, gw) patch grid (CLS excluded), sorted
ascending and unique.

Policies (config name in `conf/masking/`, source):
- `none`: keep every patch (plain CLIP).
- `random` (FLIP): a uniform random subset per sample.
- `grid` (CLIPA): one patch per window x window window (2x2: a quarter of the patches), at a random
  position per window and sample, or always the top-left one (`fixed`).
- `block` (CLIPA): one contiguous, nearly square rectangle at a random position per sample.
- `resize` (CLIPA): drops no token; the views are downsampled (`view_size`) before the encoder.
- `attentive_low` / `attentive_high` / `attentive_mixed` (A-CLIP): keep the cells the EMA encoder's CLS
  attends to most (`AttentiveLow`: discard the lowest scores; the paper's default), least
  (`AttentiveHigh`), or the top `top_ratio` share of all cells plus a random fill of the remaining budget
  (`AttentiveMixed`).
- `centered` (GLIP): random keys raised by a Gaussian density around the image centre; the top keys.
- `cluster` (cluster masking): random anchor cells mask every cell whose pixels are within a cosine
  distance `radius` of theirs, whole clusters first; the budget is met at random.
- `blockwise` (BEiT): random rectangles of at least `min_block` cells are masked until the budget.
docs/fidelity.md names each successor's published rule, code and every detail chosen here.

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
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

# Re-exported: `aclip.modules.masking.map_scores_to_views` is public API (the design's section 4).
from aclip.modules.score_geometry import kept_score_mass, map_scores_to_views  # noqa: F401
from aclip.modules.vision import Layers, check_layers
from aclip.specs import build, class_path, is_integer, is_number

Device = torch.device | str | None
# Class path -> policy class, for every subclass of TokenMasking defined in this process.
POLICIES: dict[str, type[TokenMasking]] = {}


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def _check_ratio(name: str, value: float, *, allow_zero: bool = False) -> float:
    if not is_number(value) or not (0 <= value <= 1) or (value == 0 and not allow_zero):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if not is_integer(value) or value < 1:
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


def _resolve_device(source: Tensor | None, device: Device, generator: torch.Generator | None) -> torch.device:
    """Where a policy creates its tensors: on its input `source`, else `device`, else the generator's."""
    if source is not None:
        return source.device
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def generator_on(device: torch.device) -> torch.Generator:
    """A new random generator on `device`, for the policies' draws (`select(..., generator=)`).

    The one place a device generator is made: a CUDA generator needs the driver, so the fake-CUDA trace
    of the training step (tests/test_fake_cuda.py) stands a CPU generator in here."""
    return torch.Generator(device=device)


def any_left(flags: Tensor) -> bool:
    """Whether any of `flags` is set, read on the host: the one place a policy reads a tensor's value (a
    device synchronisation), where `BlockwiseMasking`'s number of rounds depends on its draws. The
    fake-CUDA trace of the training step (tests/test_fake_cuda.py), whose tensors hold no values, stands a
    fixed number of rounds in here."""
    return bool(flags.any())


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


def _check_pixels(pixels: Tensor | None, grid: tuple[int, int], batch: int, policy: str) -> None:
    """`pixels` must be views [batch, C, H, W] whose patch grid is `grid` (H, W multiples of its sides)."""
    shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
    if (
        not isinstance(pixels, Tensor)
        or pixels.dim() != 4
        or pixels.shape[0] != batch
        or pixels.shape[2] % grid[0]
        or pixels.shape[3] % grid[1]
    ):
        raise ValueError(
            f"{policy} needs the views' pixels [batch={batch}, C, H, W] with H, W multiples of the patch "
            f"grid {tuple(grid)}, got {shape}"
        )


def _cell_pixels(pixels: Tensor, cells: tuple[int, int]) -> Tensor:
    """The pixels of each cell of a (rows, cols) cell grid over the views [B, C, H, W], row-major, as new
    float vectors: [B, rows * cols, C * (H / rows) * (W / cols)]."""
    batch, channels, height, width = pixels.shape
    rows, cols = cells
    blocks = pixels.reshape(batch, channels, rows, height // rows, cols, width // cols).permute(
        0, 2, 4, 1, 3, 5
    )
    # One pass over the pixels: the permuting copy converts them too.
    vectors = torch.empty(blocks.shape, dtype=torch.float32, device=pixels.device).copy_(blocks)
    return vectors.reshape(batch, rows * cols, -1)


def _cell_scores(scores: Tensor, grid: tuple[int, int], unit: int) -> Tensor:
    """Mean patch score of each unit x unit cell: [B, gh * gw] -> [B, cells]."""
    scores = scores.float()
    if unit == 1:
        return scores
    gh, gw = grid
    return scores.reshape(-1, gh // unit, unit, gw // unit, unit).mean(dim=(2, 4)).flatten(1)


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------


class TokenMasking:
    """The base of every policy: decisions on `unit` x `unit` cells of patches, `keep_ratio` of them kept.

    A subclass defines `select_cells` (and, where it differs, `num_kept_cells`). A policy that reads the
    EMA teacher's scores sets `needs_scores` (its cells' scores reach `select_cells`, the mean of their
    patches') and `layers`, the blocks whose CLS attention the teacher averages. A policy that reads the
    views' own pixels sets `needs_pixels` (the views reach `select_cells` as the keyword `pixels`). A
    policy that reduces tokens by resolution overrides `view_size`, which `prepare_views` follows.

    Every public subclass that selects (defines `select_cells`) is registered by its class path
    (`POLICIES`), the only classes that `build_policy` makes from a description such as a checkpoint's
    hyper-parameters; a base such as `AttentiveMasking` is not.
    """

    needs_scores: bool = False
    needs_pixels: bool = False
    layers: Layers = "all"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and cls.select_cells is not TokenMasking.select_cells:
            POLICIES[class_path(cls)] = cls

    def __init__(self, keep_ratio: float = 0.5, unit: int = 1) -> None:
        self.keep_ratio = _check_ratio("keep_ratio", keep_ratio)
        self.unit = _check_positive_int("unit", unit)

    def view_size(self, size: int, patch_size: int) -> int:
        """The side (px) a `size` px view has when it enters the online encoder: `size` itself."""
        return size

    def prepare_views(self, views: Tensor, patch_size: int) -> Tensor:
        """The views [N, 3, H, W] as the online encoder takes them, resized to `view_size` where it differs
        (bicubic, antialiased). torchvision's resize keeps uint8 pixels uint8 on every device: torch has a
        uint8 kernel on the CPU only, and torchvision resizes in float elsewhere, then rounds and clamps."""
        size = [self.view_size(side, patch_size) for side in views.shape[-2:]]
        if size == list(views.shape[-2:]):
            return views
        return resize(views, size, interpolation=InterpolationMode.BICUBIC, antialias=True)

    def num_kept_cells(self, cells: tuple[int, int]) -> int:
        """Cells kept of a (rows, cols) cell grid: round(keep_ratio * cells), halves up, at least one."""
        return max(1, _round_half_up(self.keep_ratio * cells[0] * cells[1]))

    def num_keep(self, grid: tuple[int, int]) -> int:
        """Number of patch indices `select` returns for a (gh, gw) patch grid."""
        return self.num_kept_cells(_cell_grid(grid, self.unit)) * self.unit**2

    def select_cells(
        self,
        scores: Tensor | None,
        cells: tuple[int, int],
        batch: int,
        device: torch.device,
        generator: torch.Generator | None,
        pixels: Tensor | None = None,
    ) -> Tensor:
        """Row-major indices [batch, num_kept_cells(cells)] of the kept cells; `scores` [batch, cells] are
        the cells' mean patch scores when `needs_scores`, else None; `pixels` [batch, C, H, W], the views,
        is passed only when `needs_pixels` (so a policy that reads none need not take it)."""
        raise NotImplementedError

    def select(
        self,
        scores: Tensor | None,
        grid: tuple[int, int],
        batch: int,
        *,
        device: Device = None,
        generator: torch.Generator | None = None,
        pixels: Tensor | None = None,
    ) -> Tensor:
        """Kept patch indices [batch, n_keep], row-major over `grid`, sorted ascending, CLS excluded.

        `scores` [batch, gh * gw] (higher = more attended) is read only when `needs_scores`; `pixels`
        [batch, C, H, W], the views as the online encoder takes them (uint8 or float), only when
        `needs_pixels`. Tensors are created on the device of `scores` when given, else of the pixels the
        policy reads, else on `device` (else the generator's device).
        """
        cells = _cell_grid(grid, self.unit)
        cell_scores = None
        if self.needs_scores:
            expected = (batch, grid[0] * grid[1])
            if scores is None:
                raise ValueError(f"{type(self).__name__} needs scores of shape {expected}, got None")
            if not isinstance(scores, Tensor) or tuple(scores.shape) != expected:
                shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(
                    f"scores must have shape [batch, gh * gw] = {expected} for grid {grid}, got {shape}"
                )
            cell_scores = _cell_scores(scores, grid, self.unit)
        inputs = {}
        if self.needs_pixels:
            _check_pixels(pixels, grid, batch, type(self).__name__)
            inputs["pixels"] = pixels
        source = scores if scores is not None else inputs.get("pixels")
        device = _resolve_device(source, device, generator)
        cell_idx = self.select_cells(cell_scores, cells, batch, device, generator, **inputs)
        return _cells_to_patches(cell_idx, grid, self.unit)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class NoMasking(TokenMasking):
    """Keep every patch: plain CLIP (every cell, no randomness)."""

    def __init__(self) -> None:
        super().__init__(keep_ratio=1.0)

    def select_cells(self, scores, cells, batch, device, generator):
        n = cells[0] * cells[1]
        return torch.arange(n, device=device).expand(batch, n)


class ResizeMasking(NoMasking):
    """CLIPA `resize`: keep every token of a lower-resolution view (views downsampled by `scale`)."""

    def __init__(self, scale: float = 0.5) -> None:
        super().__init__()
        self.scale = _check_ratio("scale", scale)

    def view_size(self, size: int, patch_size: int) -> int:
        """`size * scale` rounded (half up) to a multiple of `patch_size`, at least one patch."""
        size = _check_positive_int("size", size)
        patch_size = _check_positive_int("patch_size", patch_size)
        return max(1, _round_half_up(size * self.scale / patch_size)) * patch_size


class RandomMasking(TokenMasking):
    """FLIP: keep a uniform random subset of `keep_ratio` of the cells, independently per sample."""

    def select_cells(self, scores, cells, batch, device, generator):
        n = cells[0] * cells[1]
        return _random_subset(batch, n, self.num_kept_cells(cells), generator, device)


class GridMasking(TokenMasking):
    """CLIPA `grid`: keep one cell in each `window` x `window` window (keep ratio 1 / window^2).

    The kept position is random per window and per sample, or always the top-left (`fixed`). When the grid
    sides are not multiples of `window`, the ragged border windows keep one of the cells they do contain.
    """

    def __init__(self, window: int = 2, fixed: bool = False, unit: int = 1) -> None:
        self.window = _check_positive_int("window", window)
        super().__init__(keep_ratio=1 / self.window**2, unit=unit)
        self.fixed = bool(fixed)

    def num_kept_cells(self, cells: tuple[int, int]) -> int:
        return math.ceil(cells[0] / self.window) * math.ceil(cells[1] / self.window)

    def select_cells(self, scores, cells, batch, device, generator):
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


class BlockMasking(TokenMasking):
    """CLIPA `block`: keep one contiguous rectangle of about `keep_ratio` of the cells, at a uniformly random
    position per sample. The rectangle's shape is `_block_shape`; `num_keep` is its exact area."""

    def num_kept_cells(self, cells: tuple[int, int]) -> int:
        h, w = _block_shape(cells, super().num_kept_cells(cells))
        return h * w

    def select_cells(self, scores, cells, batch, device, generator):
        ch, cw = cells
        h, w = _block_shape(cells, super().num_kept_cells(cells))
        y0 = torch.randint(ch - h + 1, (batch, 1, 1), generator=generator, device=device)
        x0 = torch.randint(cw - w + 1, (batch, 1, 1), generator=generator, device=device)
        rows = y0 + torch.arange(h, device=device)[:, None]
        cols = x0 + torch.arange(w, device=device)[None, :]
        return (rows * cw + cols).flatten(1)


class AttentiveMasking(TokenMasking):
    """A-CLIP: keep cells by the EMA encoder's CLS-attention scores (a cell's score: its patches' mean),
    averaged over the blocks `layers` ("all", "last" or a list of block indices; read by the tower).
    `AttentiveLow`, `AttentiveHigh` and `AttentiveMixed` say which cells."""

    needs_scores = True

    def __init__(self, keep_ratio: float = 0.5, unit: int = 1, layers: Layers = "all") -> None:
        super().__init__(keep_ratio=keep_ratio, unit=unit)
        self.layers = check_layers(layers)


class AttentiveLow(AttentiveMasking):
    """Discard the lowest scores: keep the `keep_ratio` highest-scoring cells (the paper's default)."""

    def select_cells(self, scores, cells, batch, device, generator):
        return _top_k_sorted(scores, self.num_kept_cells(cells))


class AttentiveHigh(AttentiveMasking):
    """Discard the highest scores: keep the `keep_ratio` lowest-scoring cells."""

    def select_cells(self, scores, cells, batch, device, generator):
        return _top_k_sorted(-scores, self.num_kept_cells(cells))


class AttentiveMixed(AttentiveMasking):
    """Keep the `top_ratio` share of ALL cells with the highest scores, and fill the rest of the budget
    uniformly at random from the other cells (0 <= top_ratio <= keep_ratio)."""

    def __init__(
        self, keep_ratio: float = 0.5, unit: int = 1, top_ratio: float = 0.25, layers: Layers = "all"
    ) -> None:
        super().__init__(keep_ratio=keep_ratio, unit=unit, layers=layers)
        self.top_ratio = _check_ratio("top_ratio", top_ratio, allow_zero=True)
        if self.top_ratio > self.keep_ratio:
            raise ValueError(f"top_ratio must be in [0, keep_ratio={self.keep_ratio}], got {top_ratio}")

    def select_cells(self, scores, cells, batch, device, generator):
        # The top cells get a key above any random key in [0, 1), so they are always kept.
        n_top = _round_half_up(self.top_ratio * cells[0] * cells[1])
        keys = _random_keys(batch, scores.shape[1], generator, device)
        keys.scatter_(1, scores.topk(n_top, dim=1).indices, 2.0)
        return _top_k_sorted(keys, self.num_kept_cells(cells))


class CenteredMasking(TokenMasking):
    """GLIP: keep the `keep_ratio` of the cells with the highest keys, a key being a uniform random number in
    [0, 1) plus a Gaussian density over the cell's distance to the image centre.

    Cell centres sit at `linspace(-1, 1)` along each side of the cell grid and the density is the bivariate
    normal N(0, variance * I) there, peak 1 / (2 pi variance): among cells of similar density the random
    part decides, and a cell whose density exceeds another's by 1 or more is always kept before it.
    `variance` is what GLIP calls sigma: its published code passes that value as the covariance's diagonal.
    """

    def __init__(self, keep_ratio: float = 0.5, unit: int = 1, variance: float = 0.2) -> None:
        super().__init__(keep_ratio=keep_ratio, unit=unit)
        if not is_number(variance) or variance <= 0:
            raise ValueError(f"variance must be a number > 0, got {variance!r}")
        self.variance = float(variance)

    def density(self, cells: tuple[int, int], device: Device = None) -> Tensor:
        """The centre prior of each cell of a (rows, cols) cell grid, row-major: [rows * cols]."""
        rows = torch.linspace(-1, 1, cells[0], device=device)
        cols = torch.linspace(-1, 1, cells[1], device=device)
        squared_distance = (rows[:, None] ** 2 + cols[None, :] ** 2).flatten()
        return torch.exp(-squared_distance / (2 * self.variance)) / (2 * math.pi * self.variance)

    def select_cells(self, scores, cells, batch, device, generator):
        keys = _random_keys(batch, cells[0] * cells[1], generator, device) + self.density(cells, device)
        return _top_k_sorted(keys, self.num_kept_cells(cells))


def _centred_cosine(vectors: Tensor, anchors: Tensor) -> Tensor:
    """Cosine similarities [B, k, n] between the mean-centred `vectors` [B, n, D] (centred in place) at
    `anchors` [B, k] and all n, those of the standardised vectors; 0 where either vector is constant."""
    constant = vectors.amax(dim=-1) == vectors.amin(dim=-1)
    vectors -= vectors.mean(dim=-1, keepdim=True)
    norm = torch.linalg.vector_norm(vectors, dim=-1).masked_fill_(constant, 0.0)
    anchored = vectors.gather(1, anchors[..., None].expand(-1, -1, vectors.shape[-1]))
    dot = torch.bmm(anchored, vectors.transpose(1, 2))
    scale = norm.gather(1, anchors)[..., None] * norm[:, None]
    return torch.where(scale > 0, dot / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0)


class ClusterMasking(TokenMasking):
    """Cluster masking: mask whole clusters of cells whose raw pixels look alike.

    A cell's pixels, centred on their mean, are compared by cosine similarity (that of the standardised
    patches) with those of `anchor_ratio` of the cells drawn at random (at least one). An anchor's cluster
    is every cell within a cosine distance (1 - similarity) of `radius` of it, itself included unless it is
    flat (one grey level: no direction once centred, so near no cell). Cells are masked cluster by cluster
    in the anchors' random order, then the cells of no cluster at random, until `1 - keep_ratio` of them
    are: the clusters that fit are masked whole, the first that does not fit in part (its cells at
    random), and the budget that the clusters leave open is masked at random.
    """

    needs_pixels = True

    def __init__(
        self, keep_ratio: float = 0.5, unit: int = 1, anchor_ratio: float = 0.03, radius: float = 0.32
    ) -> None:
        super().__init__(keep_ratio=keep_ratio, unit=unit)
        self.anchor_ratio = _check_ratio("anchor_ratio", anchor_ratio)
        if not is_number(radius) or not 0 <= radius <= 2:
            raise ValueError(f"radius must be a cosine distance in [0, 2], got {radius!r}")
        self.radius = float(radius)

    def num_anchors(self, cells: tuple[int, int]) -> int:
        """Anchors on a (rows, cols) cell grid: round(anchor_ratio * cells), halves up, at least one."""
        return max(1, _round_half_up(self.anchor_ratio * cells[0] * cells[1]))

    def select_cells(self, scores, cells, batch, device, generator, pixels=None):
        num_cells, num_anchors = cells[0] * cells[1], self.num_anchors(cells)
        # topk orders the anchors by their random keys: the random order their clusters are masked in.
        anchors = _random_keys(batch, num_cells, generator, device).topk(num_anchors, dim=1).indices
        members = _centred_cosine(_cell_pixels(pixels, cells), anchors) >= 1 - self.radius
        # A cell's turn: the first anchor whose cluster holds it, or after every cluster; random within.
        turn = torch.where(members.any(dim=1), members.int().argmax(dim=1), num_anchors)
        keys = turn + _random_keys(batch, num_cells, generator, device)
        return _top_k_sorted(keys, self.num_kept_cells(cells))


# BEiT's masking generator draws up to this many blocks for one placement before it stops masking.
_BLOCK_ATTEMPTS = 10


def _masked_in_blocks(masked: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """How many cells of each block [B, k] (top, left, height, width) the mask [B, rows, cols] holds, read
    from its summed-area table."""
    cols = masked.shape[2]
    table = F.pad(masked.long().cumsum(1).cumsum(2), (1, 0, 1, 0)).flatten(1)

    def at(r: Tensor, c: Tensor) -> Tensor:
        return table.gather(1, r * (cols + 1) + c)

    bottom, right = top + height, left + width
    return at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)


class BlockwiseMasking(TokenMasking):
    """BEiT's blockwise masking: mask random rectangles of cells until `1 - keep_ratio` of them are masked.

    Each block draws an area uniformly between `min_block` cells and the budget still open, an aspect ratio
    log-uniformly in [min_aspect, 1 / min_aspect], its sides from both (rounded half to even, each shorter
    than the grid's) and a uniformly random position. It is placed when it masks at least one new cell and
    no more than the open budget, else drawn again, up to 10 times; when none is placed, masking stops and
    the rest of the budget is masked at random among the unmasked cells. All samples run this loop at
    once, one block each a round.
    """

    def __init__(
        self, keep_ratio: float = 0.5, unit: int = 1, min_block: int = 16, min_aspect: float = 0.3
    ) -> None:
        super().__init__(keep_ratio=keep_ratio, unit=unit)
        self.min_block = _check_positive_int("min_block", min_block)
        self.min_aspect = _check_ratio("min_aspect", min_aspect)

    def select_cells(self, scores, cells, batch, device, generator):
        (rows, cols), num_cells = cells, cells[0] * cells[1]
        budget = num_cells - self.num_kept_cells(cells)  # cells to mask
        masked = torch.zeros(batch, rows, cols, dtype=torch.bool, device=device)
        count = torch.zeros(batch, dtype=torch.long, device=device)
        placing = torch.full((batch,), budget > 0, device=device)
        row = torch.arange(rows, device=device)[:, None]
        col = torch.arange(cols, device=device)[None, :]
        while any_left(placing):
            open_budget = (budget - count)[:, None]
            draws = torch.rand(batch, _BLOCK_ATTEMPTS, 4, generator=generator, device=device)
            area = self.min_block + (open_budget - self.min_block) * draws[..., 0]
            aspect = torch.exp(math.log(self.min_aspect) * (1 - 2 * draws[..., 1]))
            # Sides that do not fit are clamped only to keep the indices below valid; they are never placed.
            height = (area * aspect).sqrt().round().long().clamp(max=rows)
            width = (area / aspect).sqrt().round().long().clamp(max=cols)
            top = (draws[..., 2] * (rows - height + 1)).long().minimum(rows - height)
            left = (draws[..., 3] * (cols - width + 1)).long().minimum(cols - width)
            new = height * width - _masked_in_blocks(masked, top, left, height, width)
            valid = (height < rows) & (width < cols) & (new > 0) & (new <= open_budget)
            first = valid.int().argmax(dim=1, keepdim=True)  # the first valid draw of each sample
            placed = valid.any(dim=1) & placing
            top, left, height, width = (x.gather(1, first)[..., None] for x in (top, left, height, width))
            block = (row >= top) & (row < top + height) & (col >= left) & (col < left + width)
            masked |= block & placed[:, None, None]
            count += new.gather(1, first).squeeze(1) * placed
            placing = placed & (count < budget)
        # Unmasked cells first; the budget that no block filled is masked among them at random.
        keys = (~masked).flatten(1) + _random_keys(batch, num_cells, generator, device)
        return _top_k_sorted(keys, self.num_kept_cells(cells))


def build_policy(spec: Mapping[str, Any] | None) -> TokenMasking:
    """The policy a `masking` description names (None or empty: keep every token), from `POLICIES` only."""
    return build(spec, POLICIES, "masking") if spec else NoMasking()
