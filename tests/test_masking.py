"""Token-reduction policies: the `select` contract, each strategy's defining property, validation."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aclip.modules.masking import (
    AttentiveHigh,
    AttentiveLow,
    AttentiveMixed,
    BlockMasking,
    BlockwiseMasking,
    CenteredMasking,
    ClusterMasking,
    GridMasking,
    NoMasking,
    RandomMasking,
    ResizeMasking,
    TokenMasking,
)
from aclip.modules.score_geometry import kept_score_mass

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "masking"
ATTENTIVE = {"low": AttentiveLow, "high": AttentiveHigh, "mixed": AttentiveMixed}
GRIDS = [(7, 5), (9, 9), (8, 8), (14, 14)]
RATIOS = [0.25, 0.5, 0.75]
BATCH = 6

# Strategies that take keep_ratio and unit; grid (whose ratio is fixed by its window) is tested on its own.
CELL_STRATEGIES: dict[str, Callable[[float, int], TokenMasking]] = {
    "random": lambda r, u: RandomMasking(keep_ratio=r, unit=u),
    "block": lambda r, u: BlockMasking(keep_ratio=r, unit=u),
    "attentive_low": lambda r, u: AttentiveLow(keep_ratio=r, unit=u),
    "attentive_high": lambda r, u: AttentiveHigh(keep_ratio=r, unit=u),
    "attentive_mixed": lambda r, u: AttentiveMixed(keep_ratio=r, unit=u, top_ratio=r / 2),
    "centered": lambda r, u: CenteredMasking(keep_ratio=r, unit=u),
    "cluster": lambda r, u: ClusterMasking(keep_ratio=r, unit=u),
    "blockwise": lambda r, u: BlockwiseMasking(keep_ratio=r, unit=u, min_block=4),
}
# Strategies whose output depends on the generator.
RANDOM_STRATEGIES: dict[str, Callable[[], TokenMasking]] = {
    "random": lambda: RandomMasking(keep_ratio=0.5),
    "grid": lambda: GridMasking(),
    "block": lambda: BlockMasking(keep_ratio=0.25),
    "attentive_mixed": lambda: AttentiveMixed(keep_ratio=0.5, top_ratio=0.25),
    "centered": lambda: CenteredMasking(keep_ratio=0.5),
    "cluster": lambda: ClusterMasking(keep_ratio=0.5),
    "blockwise": lambda: BlockwiseMasking(keep_ratio=0.5),
}


def make_scores(batch: int, grid: tuple[int, int], seed: int = 123) -> torch.Tensor:
    """Random scores: distinct (with probability 1) per patch and per cell mean."""
    return torch.rand(batch, grid[0] * grid[1], generator=torch.Generator().manual_seed(seed))


def make_pixels(batch: int, grid: tuple[int, int], seed: int = 123) -> torch.Tensor:
    """Random uint8 views [batch, 3, H, W] with 2 x 2-pixel patches over `grid`."""
    size = (batch, 3, 2 * grid[0], 2 * grid[1])
    return torch.randint(0, 256, size, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def run(
    masking: TokenMasking,
    grid: tuple[int, int],
    batch: int = BATCH,
    seed: int = 0,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    if scores is None and masking.needs_scores:
        scores = make_scores(batch, grid)
    pixels = make_pixels(batch, grid) if masking.needs_pixels else None
    return masking.select(scores, grid, batch, generator=torch.Generator().manual_seed(seed), pixels=pixels)


def kept_cells(keep: torch.Tensor, grid: tuple[int, int], unit: int) -> list[set[tuple[int, int]]]:
    """Per sample, the (row, col) cells on the unit-cell grid that hold kept patches."""
    gw = grid[1]
    return [{(int(i) // gw // unit, int(i) % gw // unit) for i in row} for row in keep]


def expected_cells(ratio: float, num_cells: int) -> int:
    return max(1, math.floor(ratio * num_cells + 0.5))


def check_contract(keep: torch.Tensor, grid: tuple[int, int], batch: int, n_keep: int) -> None:
    assert keep.dtype == torch.long
    assert keep.shape == (batch, n_keep)
    assert keep.min() >= 0 and keep.max() < grid[0] * grid[1]
    if n_keep > 1:
        assert (keep.diff(dim=1) > 0).all(), "indices must be sorted ascending and unique"


# ---------------------------------------------------------------------------------------------------
# The select contract
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("unit", [1, 2])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", list(CELL_STRATEGIES))
def test_cell_strategies_contract(name: str, grid: tuple[int, int], unit: int, ratio: float) -> None:
    masking = CELL_STRATEGIES[name](ratio, unit)
    if grid[0] % unit or grid[1] % unit:
        with pytest.raises(ValueError, match=rf"grid \({grid[0]}, {grid[1]}\).*unit {unit}"):
            run(masking, grid)
        with pytest.raises(ValueError, match="not divisible"):
            masking.num_keep(grid)
        return
    keep = run(masking, grid)
    check_contract(keep, grid, BATCH, masking.num_keep(grid))
    num_cells = grid[0] * grid[1] // unit**2
    if name != "block":  # block keeps the area of its rectangle: see test_block_*
        assert keep.shape[1] == expected_cells(ratio, num_cells) * unit**2
    # Whole cells are kept: every touched cell contributes all its unit^2 patches.
    for cells, row in zip(kept_cells(keep, grid, unit), keep, strict=True):
        assert len(cells) * unit**2 == len(row)


@pytest.mark.parametrize("grid", [(7, 5), (8, 8), (3, 3)])
def test_none_and_resize_keep_everything(grid: tuple[int, int]) -> None:
    for masking in (NoMasking(), ResizeMasking(scale=0.5)):
        keep = masking.select(None, grid, 3)
        check_contract(keep, grid, 3, masking.num_keep(grid))
        assert torch.equal(keep, torch.arange(grid[0] * grid[1]).expand(3, -1))


def test_keep_ratio_one_keeps_everything_and_tiny_ratio_keeps_one_cell() -> None:
    keep = run(RandomMasking(keep_ratio=1.0, unit=2), (8, 8))
    assert torch.equal(keep, torch.arange(64).expand(BATCH, -1))
    assert run(RandomMasking(keep_ratio=0.001, unit=2), (8, 8)).shape == (BATCH, 4)


def test_tensors_follow_scores_device_and_generator_device() -> None:
    scores = make_scores(2, (4, 4))
    masking = AttentiveMixed(keep_ratio=0.5)
    assert masking.select(scores, (4, 4), 2).device == scores.device
    assert RandomMasking().select(None, (4, 4), 2, device="cpu").device.type == "cpu"


# ---------------------------------------------------------------------------------------------------
# Attentive strategies
# ---------------------------------------------------------------------------------------------------


def ranked_cells(scores: torch.Tensor, grid: tuple[int, int], unit: int) -> list[list[tuple[int, int]]]:
    """Per sample, cells sorted by the mean of their patches' scores, highest first (computed naively)."""
    gh, gw = grid
    ranked = []
    for sample in scores.tolist():
        means = {}
        for r in range(gh // unit):
            for c in range(gw // unit):
                patches = [
                    sample[(r * unit + dy) * gw + c * unit + dx] for dy in range(unit) for dx in range(unit)
                ]
                means[(r, c)] = sum(patches) / len(patches)
        ranked.append(sorted(means, key=means.__getitem__, reverse=True))
    return ranked


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(
    ("grid", "unit"), [((7, 5), 1), ((9, 9), 1), ((8, 8), 1), ((8, 8), 2), ((14, 14), 2)]
)
@pytest.mark.parametrize("strategy", ["low", "high"])
def test_attentive_keeps_top_or_bottom_cells(
    strategy: str, grid: tuple[int, int], unit: int, ratio: float
) -> None:
    scores = make_scores(BATCH, grid)
    keep = run(ATTENTIVE[strategy](keep_ratio=ratio, unit=unit), grid, scores=scores)
    k = expected_cells(ratio, grid[0] * grid[1] // unit**2)
    for cells, ranking in zip(kept_cells(keep, grid, unit), ranked_cells(scores, grid, unit), strict=True):
        expected = ranking[:k] if strategy == "low" else ranking[-k:]
        assert cells == set(expected)


def test_attentive_low_unit2_uses_cell_mean_not_max() -> None:
    # Cell (0, 0) holds the single highest patch but the lowest mean; cell (0, 1) has the highest mean.
    scores = torch.tensor([[10.0, -20.0, 3.0, 3.0, -20.0, 0.0, 3.0, 3.0] + [1.0] * 8])
    keep = AttentiveLow(keep_ratio=0.25, unit=2).select(scores, (4, 4), 1)
    assert keep.tolist() == [[2, 3, 6, 7]]


@pytest.mark.parametrize(("grid", "unit"), [((7, 5), 1), ((9, 9), 1), ((8, 8), 2), ((14, 14), 2)])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_attentive_mixed_keeps_top_share_and_random_rest(
    grid: tuple[int, int], unit: int, ratio: float
) -> None:
    scores = make_scores(BATCH, grid)
    masking = AttentiveMixed(keep_ratio=ratio, unit=unit, top_ratio=0.25)
    num_cells = grid[0] * grid[1] // unit**2
    n_top, n_keep = math.floor(0.25 * num_cells + 0.5), expected_cells(ratio, num_cells)
    keeps = [run(masking, grid, seed=seed, scores=scores) for seed in (0, 1)]
    for keep in keeps:
        assert keep.shape == (BATCH, n_keep * unit**2)
        for cells, ranking in zip(
            kept_cells(keep, grid, unit), ranked_cells(scores, grid, unit), strict=True
        ):
            assert set(ranking[:n_top]) <= cells
            assert len(cells) == n_keep
    assert not torch.equal(keeps[0], keeps[1]), "the random rest must depend on the generator"
    assert torch.equal(keeps[0], run(masking, grid, seed=0, scores=scores))
    # The rest is not simply the next-highest cells.
    low = run(AttentiveLow(keep_ratio=ratio, unit=unit), grid, scores=scores)
    assert not torch.equal(keeps[0], low)


def test_attentive_mixed_extremes() -> None:
    grid, scores = (8, 8), make_scores(BATCH, (8, 8))
    low = run(AttentiveLow(keep_ratio=0.5), grid, scores=scores)
    all_top = run(AttentiveMixed(keep_ratio=0.5, top_ratio=0.5), grid, seed=3, scores=scores)
    assert torch.equal(all_top, low)
    # top_ratio 0: a random subset, independent of the scores.
    no_top = AttentiveMixed(keep_ratio=0.5, top_ratio=0.0)
    assert torch.equal(run(no_top, grid, seed=3, scores=scores), run(no_top, grid, seed=3, scores=-scores))


# ---------------------------------------------------------------------------------------------------
# Grid and block
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize(
    ("grid", "window", "unit"),
    [((8, 8), 2, 1), ((7, 5), 2, 1), ((9, 9), 2, 1), ((14, 14), 2, 2), ((14, 14), 3, 1), ((8, 8), 3, 2)],
)
def test_grid_keeps_one_per_window(grid: tuple[int, int], window: int, unit: int, fixed: bool) -> None:
    masking = GridMasking(window=window, fixed=fixed, unit=unit)
    keep = run(masking, grid, batch=64)
    ch, cw = grid[0] // unit, grid[1] // unit
    n_windows = math.ceil(ch / window) * math.ceil(cw / window)
    check_contract(keep, grid, 64, masking.num_keep(grid))
    assert keep.shape[1] == n_windows * unit**2
    positions: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for cells in kept_cells(keep, grid, unit):
        per_window: dict[tuple[int, int], int] = {}
        for r, c in cells:
            per_window[(r // window, c // window)] = per_window.get((r // window, c // window), 0) + 1
            positions.setdefault((r // window, c // window), set()).add((r % window, c % window))
        assert len(per_window) == n_windows and set(per_window.values()) == {1}
    for (wr, wc), seen in positions.items():
        height, width = min(window, ch - wr * window), min(window, cw - wc * window)
        # Fixed: always the top-left cell. Random: every cell the window has shows up over 64 samples.
        expected = {(0, 0)} if fixed else {(dy, dx) for dy in range(height) for dx in range(width)}
        assert seen == expected


def check_rectangles(keep: torch.Tensor, grid: tuple[int, int], unit: int) -> list[tuple[int, int, int, int]]:
    """Asserts each sample's kept cells form one full rectangle; returns (top, left, height, width)."""
    boxes = []
    for cells in kept_cells(keep, grid, unit):
        rows, cols = [r for r, _ in cells], [c for _, c in cells]
        top, left = min(rows), min(cols)
        height, width = max(rows) - top + 1, max(cols) - left + 1
        assert height * width == len(cells)
        boxes.append((top, left, height, width))
    return boxes


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(
    ("grid", "unit"), [((7, 5), 1), ((9, 9), 1), ((8, 8), 1), ((8, 8), 2), ((14, 14), 1)]
)
def test_block_is_one_nearly_square_rectangle(grid: tuple[int, int], unit: int, ratio: float) -> None:
    keep = run(BlockMasking(keep_ratio=ratio, unit=unit), grid, batch=16)
    boxes = check_rectangles(keep, grid, unit)
    ch, cw = grid[0] // unit, grid[1] // unit
    target = expected_cells(ratio, ch * cw)
    for _, _, height, width in boxes:
        assert max(height, width) <= 2 * min(height, width)
        # Close to the budget: no nearly square rectangle in the grid is closer.
        assert abs(height * width - target) <= min(
            abs(h * w - target)
            for h in range(1, ch + 1)
            for w in range(1, cw + 1)
            if max(h, w) <= 2 * min(h, w)
        )


@pytest.mark.parametrize(
    ("grid", "ratio", "shape"),
    [
        ((8, 8), 0.25, (4, 4)),
        ((14, 14), 0.5, (7, 14)),
        ((14, 14), 0.25, (7, 7)),
        ((14, 14), 13 / 196, (3, 4)),
    ],
)
def test_block_shape(grid: tuple[int, int], ratio: float, shape: tuple[int, int]) -> None:
    masking = BlockMasking(keep_ratio=ratio)
    boxes = check_rectangles(run(masking, grid), grid, 1)
    assert {(h, w) for _, _, h, w in boxes} == {shape}
    assert masking.num_keep(grid) == shape[0] * shape[1]


def test_block_position_is_uniform_over_valid_offsets() -> None:
    boxes = check_rectangles(run(BlockMasking(keep_ratio=0.25), (8, 8), batch=400), (8, 8), 1)
    # A 4x4 block in an 8x8 grid has 5 x 5 top-left positions; all are used.
    assert {(top, left) for top, left, _, _ in boxes} == {(y, x) for y in range(5) for x in range(5)}
    other = check_rectangles(run(BlockMasking(keep_ratio=0.25), (8, 8), batch=400, seed=1), (8, 8), 1)
    assert boxes != other


# ---------------------------------------------------------------------------------------------------
# Resize
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "size", "patch_size", "expected"),
    [(0.5, 224, 16, 112), (0.25, 224, 16, 64), (0.5, 100, 16, 48), (0.01, 224, 16, 16), (1.0, 224, 14, 224)],
)
def test_resize_image_size(scale: float, size: int, patch_size: int, expected: int) -> None:
    assert ResizeMasking(scale=scale).view_size(size, patch_size) == expected


def _pixels(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_resize_keeps_uint8_views_uint8_and_matches_a_float_resize() -> None:
    views = _pixels((2, 3, 32, 32))
    resized = ResizeMasking(scale=0.5).prepare_views(views, 8)
    in_float = ResizeMasking(scale=0.5).prepare_views(views.float(), 8)
    assert resized.dtype == torch.uint8 and resized.shape == (2, 3, 16, 16)
    assert in_float.dtype == torch.float32
    assert (resized.float() - in_float.clamp(0, 255)).abs().max() <= 2  # the uint8 kernel's fixed point


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resize_of_uint8_views_on_cuda_matches_the_cpu() -> None:
    # torch has no uint8 antialiased bicubic kernel on CUDA: the views must not reach it as uint8.
    views = _pixels((2, 3, 32, 32))
    on_cpu = ResizeMasking(scale=0.5).prepare_views(views, 8)
    on_cuda = ResizeMasking(scale=0.5).prepare_views(views.cuda(), 8)
    assert on_cuda.dtype == torch.uint8 and on_cuda.device.type == "cuda"
    assert (on_cuda.cpu().int() - on_cpu.int()).abs().max() <= 2


def test_resize_flags() -> None:
    assert ResizeMasking().view_size(224, 16) == 112 and ResizeMasking().scale == 0.5
    others = [NoMasking(), GridMasking(), AttentiveLow(), *(f(0.5, 1) for f in CELL_STRATEGIES.values())]
    assert all(m.view_size(224, 16) == 224 for m in others)
    assert [m.needs_scores for m in (NoMasking(), ResizeMasking(), RandomMasking(), AttentiveLow())] == [
        False,
        False,
        False,
        True,
    ]
    readers = {name for name, make in CELL_STRATEGIES.items() if make(0.5, 1).needs_pixels}
    assert readers == {"cluster"}


# ---------------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RANDOM_STRATEGIES))
def test_randomness_is_reproducible_and_per_sample(name: str) -> None:
    masking, grid = RANDOM_STRATEGIES[name](), (14, 14)
    scores = make_scores(16, grid)
    first = run(masking, grid, batch=16, seed=0, scores=scores)
    assert torch.equal(first, run(masking, grid, batch=16, seed=0, scores=scores))
    assert not torch.equal(first, run(masking, grid, batch=16, seed=1, scores=scores))
    assert len({tuple(row.tolist()) for row in first}) > 1, "samples of a batch must differ"
    # Without a generator, the global RNG is the only source.
    pixels = make_pixels(16, grid)
    torch.manual_seed(7)
    a = masking.select(scores, grid, 16, pixels=pixels)
    torch.manual_seed(7)
    assert torch.equal(a, masking.select(scores, grid, 16, pixels=pixels))


@pytest.mark.parametrize("strategy", ["low", "high"])
def test_attentive_low_high_are_deterministic(strategy: str) -> None:
    masking, grid = ATTENTIVE[strategy](), (8, 8)
    scores = make_scores(4, grid)
    assert torch.equal(
        run(masking, grid, 4, seed=0, scores=scores), run(masking, grid, 4, seed=1, scores=scores)
    )


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores",
    [None, torch.rand(BATCH, 63), torch.rand(BATCH + 1, 64), torch.rand(BATCH * 64), torch.rand(BATCH, 8, 8)],
    ids=["missing", "wrong-n", "wrong-batch", "1d", "3d"],
)
@pytest.mark.parametrize("strategy", list(ATTENTIVE))
def test_attentive_bad_scores_raise(strategy: str, scores: torch.Tensor | None) -> None:
    with pytest.raises(ValueError, match="scores"):
        ATTENTIVE[strategy]().select(scores, (8, 8), BATCH)


@pytest.mark.parametrize(
    "pixels",
    [
        None,
        make_pixels(BATCH + 1, (8, 8)),
        make_pixels(BATCH, (8, 8))[:, :, :15],
        make_pixels(BATCH, (8, 8))[0],
    ],
    ids=["missing", "wrong-batch", "ragged-height", "3d"],
)
def test_pixel_policies_reject_bad_pixels(pixels: torch.Tensor | None) -> None:
    with pytest.raises(ValueError, match=r"ClusterMasking needs the views' pixels \[batch=6, C, H, W\]"):
        ClusterMasking().select(None, (8, 8), BATCH, pixels=pixels)


def test_pixel_policies_follow_the_pixels_device() -> None:
    assert (
        ClusterMasking().select(None, (4, 4), 2, device="meta", pixels=make_pixels(2, (4, 4))).device.type
        == "cpu"
    )


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: RandomMasking(keep_ratio=0), "keep_ratio"),
        (lambda: RandomMasking(keep_ratio=1.5), "keep_ratio"),
        (lambda: BlockMasking(keep_ratio=-0.1), "keep_ratio"),
        (lambda: AttentiveLow(keep_ratio="half"), "keep_ratio"),
        (lambda: RandomMasking(unit=0), "unit"),
        (lambda: BlockMasking(unit=1.5), "unit"),
        (lambda: GridMasking(unit=0), "unit"),
        (lambda: AttentiveLow(unit=-1), "unit"),
        (lambda: GridMasking(window=0), "window"),
        (lambda: ResizeMasking(scale=0), "scale"),
        (lambda: ResizeMasking(scale=1.5), "scale"),
        (lambda: ResizeMasking().view_size(0, 16), "size"),
        (lambda: AttentiveMixed(keep_ratio=0.5, top_ratio=0.6), "top_ratio"),
        (lambda: AttentiveMixed(top_ratio=-0.1), "top_ratio"),
        (lambda: AttentiveLow(layers="first"), "layers"),
        (lambda: AttentiveLow(layers=[]), "layers"),
        (lambda: AttentiveLow(layers=[1.5]), "layers"),
        (lambda: AttentiveLow(layers=["a"]), "layers"),
        (lambda: AttentiveLow(layers=True), "layers"),
        (lambda: CenteredMasking(variance=0), "variance"),
        (lambda: CenteredMasking(variance="wide"), "variance"),
        (lambda: ClusterMasking(anchor_ratio=0), "anchor_ratio"),
        (lambda: ClusterMasking(radius=-0.1), "radius"),
        (lambda: ClusterMasking(radius=2.5), "radius"),
        (lambda: BlockwiseMasking(min_block=0), "min_block"),
        (lambda: BlockwiseMasking(min_aspect=1.5), "min_aspect"),
    ],
)
def test_invalid_arguments_raise(factory: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_valid_layers_are_stored() -> None:
    assert AttentiveLow(layers="last").layers == "last"
    assert AttentiveLow(layers=OmegaConf.create([0, 11])).layers == [0, 11]


# ---------------------------------------------------------------------------------------------------
# kept_score_mass and configs
# ---------------------------------------------------------------------------------------------------


def test_kept_score_mass() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    keep = torch.tensor([[0, 3], [2, 3], [1, 2]])
    assert torch.allclose(kept_score_mass(scores, keep), torch.tensor([0.5, 1.0, 0.5]))


EXPECTED_CONFIGS = {
    "none": (NoMasking, {}),
    "random": (RandomMasking, {"keep_ratio": 0.5, "unit": 1}),
    "grid": (GridMasking, {"window": 2, "fixed": False, "unit": 1}),
    "block": (BlockMasking, {"keep_ratio": 0.5, "unit": 1}),
    "resize": (ResizeMasking, {"scale": 0.5}),
    "attentive_low": (AttentiveLow, {"keep_ratio": 0.5, "layers": "all"}),
    "attentive_high": (AttentiveHigh, {"keep_ratio": 0.5, "layers": "all"}),
    "attentive_mixed": (AttentiveMixed, {"top_ratio": 0.25, "layers": "all"}),
    "centered": (CenteredMasking, {"keep_ratio": 0.5, "unit": 1, "variance": 0.2}),
    "cluster": (ClusterMasking, {"keep_ratio": 0.5, "unit": 1, "anchor_ratio": 0.03, "radius": 0.32}),
    "blockwise": (BlockwiseMasking, {"keep_ratio": 0.5, "unit": 1, "min_block": 16, "min_aspect": 0.3}),
}


def test_config_group_is_complete() -> None:
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} == set(EXPECTED_CONFIGS)


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_instantiates(path: Path) -> None:
    masking = instantiate(OmegaConf.load(path))
    cls, attrs = EXPECTED_CONFIGS[path.stem]
    assert isinstance(masking, TokenMasking) and type(masking) is cls
    assert {k: getattr(masking, k) for k in attrs} == attrs
    keep = run(masking, (14, 14), batch=2)
    check_contract(keep, (14, 14), 2, masking.num_keep((14, 14)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    grid, scores, pixels = (14, 14), make_scores(8, (14, 14)).cuda(), make_pixels(8, (14, 14)).cuda()
    maskings = [f(0.5, 2) for f in CELL_STRATEGIES.values()] + [GridMasking(), NoMasking()]
    for masking in maskings:
        generator = torch.Generator(device="cuda").manual_seed(0)
        keep = masking.select(scores, grid, 8, generator=generator, pixels=pixels)
        assert keep.device.type == "cuda"
        check_contract(keep.cpu(), grid, 8, masking.num_keep(grid))
        generator = torch.Generator(device="cuda").manual_seed(0)
        assert torch.equal(
            keep,
            masking.select(
                None if not masking.needs_scores else scores,
                grid,
                8,
                device="cuda",
                generator=generator,
                pixels=pixels,
            ),
        )
