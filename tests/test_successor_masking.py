"""The successors' masking policies against independent references of their published rules (GLIP's centred
keys, cluster masking's whole clusters, BEiT's blocks), and each preset training through `train.py`.

The shared `select` contract (unique, sorted, in range, budget, generator-only randomness) is tested for
them with every other policy in tests/test_masking.py."""

from __future__ import annotations

import csv
import math
import random

import numpy as np
import pytest
import torch

from aclip.modules.masking import BlockwiseMasking, CenteredMasking, ClusterMasking
from aclip.tasks import train

# Statistical tests pass while every estimate is within this many standard errors of its reference: the
# chance that one of at most a few hundred estimates strays that far by luck is below 1e-4.
Z = 5.0


def keep_frequency(keep: torch.Tensor, cells: int) -> np.ndarray:
    """The share of the samples (rows of `keep`) that keep each cell."""
    counts = torch.zeros(cells).scatter_add_(0, keep.flatten(), torch.ones(keep.numel()))
    return (counts / len(keep)).numpy()


# ---------------------------------------------------------------------------------------------------
# centered: GLIP keeps the top keys of uniform noise plus a Gaussian density around the centre
# ---------------------------------------------------------------------------------------------------


def glip_density(rows: int, cols: int, variance: float) -> np.ndarray:
    """GLIP's prior, row-major: the pdf of a bivariate normal of mean 0 and covariance [[v, 0], [0, v]] (its
    code's `std` is that v) at cell centres on linspace(-1, 1) along each side."""
    y, x = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    points = np.stack([x.ravel(), y.ravel()], axis=1)
    covariance = np.diag([variance, variance])
    mahalanobis = np.einsum("ni,ij,nj->n", points, np.linalg.inv(covariance), points)
    return np.exp(-mahalanobis / 2) / (2 * np.pi * np.sqrt(np.linalg.det(covariance)))


def glip_keep_probabilities(density: np.ndarray, k: int, points: int = 200) -> np.ndarray:
    """P(cell i is among the k highest keys u + density), u ~ U[0, 1) independent per cell, computed exactly:
    over cell i's noise u (midpoint rule), the number of other cells whose key exceeds u + density[i] is a sum
    of independent Bernoullis (probability clip(1 - (u + density[i] - density[j]), 0, 1)), and i is kept
    when it is at most k - 1 (its distribution by dynamic programming, truncated at k - 1)."""
    n = len(density)
    threshold = (np.arange(points) + 0.5) / points + density[:, None]  # [i, t]
    at_most = np.zeros((n, points, k))
    at_most[..., 0] = 1.0
    for j in range(n):
        p = np.clip(1 - (threshold - density[j]), 0, 1)
        p[j] = 0.0  # a cell does not compete with itself
        shifted = np.concatenate([np.zeros((n, points, 1)), at_most[..., :-1]], axis=2)
        at_most = at_most * (1 - p[..., None]) + shifted * p[..., None]
    return at_most.sum(axis=2).mean(axis=1)


@pytest.mark.parametrize(
    ("grid", "unit", "variance"), [((8, 8), 1, 0.2), ((8, 8), 2, 0.2), ((6, 4), 1, 0.1), ((8, 8), 1, 0.8)]
)
def test_centered_keeps_each_cell_as_often_as_glips_rule(grid, unit, variance):
    masking, draws = CenteredMasking(keep_ratio=0.5, unit=unit, variance=variance), 20_000
    rows, cols = grid[0] // unit, grid[1] // unit
    reference = glip_keep_probabilities(
        glip_density(rows, cols, variance), masking.num_kept_cells((rows, cols))
    )
    keep = masking.select(None, grid, draws, generator=torch.Generator().manual_seed(0))
    # A kept cell brings its unit^2 patches: each cell once per sample.
    cell = ((keep // grid[1] // unit) * cols + keep % grid[1] // unit).sort(dim=1).values[:, :: unit**2]
    frequency = keep_frequency(cell, rows * cols)
    standard_error = np.sqrt(reference * (1 - reference) / draws) + 1e-4
    assert np.all(np.abs(frequency - reference) <= Z * standard_error)
    # The prior matters: the centre is kept more often than the corners (0.99 against 0.32 at variance 0.2).
    assert reference.max() - reference.min() > 0.1


def test_centered_density_is_glips_gaussian():
    for grid in [(14, 14), (15, 9)]:
        density = CenteredMasking(variance=0.2).density(grid)
        assert torch.allclose(density.double(), torch.from_numpy(glip_density(*grid, 0.2)), rtol=1e-5)
    # An odd side has a cell at the centre, at GLIP's peak 1 / (2 pi 0.2) = 0.80.
    assert CenteredMasking(variance=0.2).density((15, 15)).max() == pytest.approx(1 / (0.4 * math.pi))


# ---------------------------------------------------------------------------------------------------
# cluster: every cell within `radius` of a random anchor is masked with it, whole clusters first
# ---------------------------------------------------------------------------------------------------

# Chroma directions orthogonal to grey (1, 1, 1): per-patch standardisation removes brightness and contrast,
# so flat patches of these hues are at cosine distance 1 (neighbours) or 2 (opposites) from each other.
_RED_AXIS = np.array([2.0, -1.0, -1.0]) / math.sqrt(6)
_GREEN_BLUE_AXIS = np.array([0.0, 1.0, -1.0]) / math.sqrt(2)


def flat_regions(labels: np.ndarray, batch: int, cell_px: int = 4, seed: int = 0) -> torch.Tensor:
    """uint8 images [batch, 3, H, W] painting each cell of `labels` [rows, cols] in its region's hue (hues a
    quarter turn apart), with +-2 levels of pixel noise: regions of near-identical cells."""
    angles = labels * (math.pi / 2)
    colour = 0.5 + 0.25 * (
        np.cos(angles)[..., None] * _RED_AXIS + np.sin(angles)[..., None] * _GREEN_BLUE_AXIS
    )
    image = np.repeat(np.repeat(colour.transpose(2, 0, 1), cell_px, axis=1), cell_px, axis=2) * 255
    noise = np.random.default_rng(seed).integers(-2, 3, size=(batch, *image.shape))
    return torch.from_numpy(np.clip(np.rint(image) + noise, 0, 255).astype(np.uint8))


def masked_sets(keep: torch.Tensor, cells: int) -> list[set[int]]:
    return [set(range(cells)) - set(row.tolist()) for row in keep]


def test_cluster_masks_the_anchors_region_whole_and_fills_at_random():
    # 8 x 8 cells: region A the left 5 columns (40 cells), region B the right 3 (24); one anchor (1 % of 64),
    # half the cells masked (32). The rule: an anchor in B masks B whole and 8 random cells of A; an
    # anchor in A masks 32 of A's 40 cells (the cluster does not fit: part of it, at random) and none of B.
    labels = np.zeros((8, 8), dtype=int)
    labels[:, 5:] = 2
    region_a, region_b = set(np.flatnonzero(labels == 0)), set(np.flatnonzero(labels == 2))
    draws = 2000
    masking = ClusterMasking(keep_ratio=0.5, anchor_ratio=0.01)
    keep = masking.select(
        None, (8, 8), draws, generator=torch.Generator().manual_seed(0), pixels=flat_regions(labels, draws)
    )
    anchor_in_b = 0
    extra_in_a = np.zeros(64)
    for masked in masked_sets(keep, 64):
        if region_b <= masked:
            anchor_in_b += 1
            assert len(masked & region_a) == 8
            extra_in_a[list(masked & region_a)] += 1
        else:
            assert masked <= region_a, "an anchor in A masks only A's cells"
    # The anchor is a uniformly random cell: in B with probability 24 / 64.
    p = 24 / 64
    assert abs(anchor_in_b / draws - p) <= Z * math.sqrt(p * (1 - p) / draws)
    # The fill is uniform over A: each of its cells is among the 8 with probability 8 / 40.
    share = extra_in_a[list(region_a)] / anchor_in_b
    assert np.all(np.abs(share - 0.2) <= Z * math.sqrt(0.2 * 0.8 / anchor_in_b))


def test_cluster_masks_clusters_whole_in_the_anchors_order():
    # Regions of 24, 24, 8 and 8 cells in four hues; 2 anchors; 32 of 64 cells masked. The first anchor's
    # region is always masked whole; the second's too when the two fit in the budget (different regions,
    # not both of 24: probability 2 * (4 * 24 * 8 + 8 * 8) / (64 * 63)); two regions of 24 leave the second
    # masked in part. A radius below the pixel noise leaves each anchor alone: random masking.
    labels = np.zeros((8, 8), dtype=int)
    labels[:, 3:6], labels[:4, 6:], labels[4:, 6:] = 1, 2, 3
    regions = [set(np.flatnonzero(labels == label)) for label in range(4)]
    draws = 2000
    pixels = flat_regions(labels, draws)

    def whole_regions(radius: float) -> list[int]:
        masking = ClusterMasking(keep_ratio=0.5, anchor_ratio=2 / 64, radius=radius)
        keep = masking.select(None, (8, 8), draws, generator=torch.Generator().manual_seed(1), pixels=pixels)
        return [sum(region <= masked for region in regions) for masked in masked_sets(keep, 64)]

    whole = whole_regions(0.32)
    assert min(whole) >= 1
    p = 2 * (4 * 24 * 8 + 8 * 8) / (64 * 63)
    assert abs(whole.count(2) / draws - p) <= Z * math.sqrt(p * (1 - p) / draws)
    # By chance, random masking covers one of the 8-cell regions in 2 * 0.3 % of the samples.
    assert sum(count > 0 for count in whole_regions(1e-6)) < 0.02 * draws


@pytest.mark.parametrize("scale", [255, 1], ids=["uint8", "float"])
def test_cluster_flat_grey_cells_join_no_cluster(scale):
    # Left half one flat grey (no direction once centred), right half one hue; one anchor, 32 of 64 cells
    # masked. An anchor in the hue masks that half; an anchor on the grey masks nothing, so the budget goes
    # at random and the grey half is never masked whole (in float32 too, where centring leaves rounding).
    labels = np.zeros((8, 8), dtype=int)
    labels[:, 4:] = 1
    pixels = flat_regions(labels, 400).float() / 255 * scale
    pixels[..., :16] = 0.7 * scale
    grey_cell = pixels[0, :, :4, :4].flatten()
    assert scale == 255 or (grey_cell - grey_cell.mean()).abs().max() > 0  # float32 leaves rounding
    keep = ClusterMasking(keep_ratio=0.5, anchor_ratio=0.01).select(
        None, (8, 8), 400, generator=torch.Generator().manual_seed(0), pixels=pixels
    )
    halves = [set(np.flatnonzero(labels == side)) for side in (0, 1)]
    masked = masked_sets(keep, 64)
    assert not any(cells == halves[0] for cells in masked)
    assert abs(sum(cells == halves[1] for cells in masked) / 400 - 0.5) <= Z * math.sqrt(0.25 / 400)


def test_cluster_ignores_brightness_and_contrast():
    # Two regions of 32 cells, each one texture at a random brightness and contrast per cell (a * texture +
    # b): the cells of a region are at cosine distance 0 after centring, so one anchor's cluster is its
    # region, exactly the budget of 32.
    generator = torch.Generator().manual_seed(0)
    textures = torch.randint(0, 61, (2, 3, 4, 4), generator=generator)
    region = torch.zeros(8, 8, dtype=torch.long)
    region[:, 4:] = 1
    contrast = torch.randint(1, 4, (8, 8), generator=generator)
    brightness = torch.randint(0, 61, (8, 8), generator=generator)
    cells = contrast[..., None, None, None] * textures[region] + brightness[..., None, None, None]
    image = cells.permute(2, 0, 3, 1, 4).reshape(3, 32, 32).to(torch.uint8)  # [3, rows * 4, cols * 4]
    masking = ClusterMasking(keep_ratio=0.5, anchor_ratio=0.01)
    keep = masking.select(None, (8, 8), 50, generator=generator, pixels=image.expand(50, -1, -1, -1))
    halves = {frozenset(torch.nonzero(region.flatten() == side).flatten().tolist()) for side in (0, 1)}
    assert {frozenset(masked) for masked in masked_sets(keep, 64)} == halves  # each, and only they


# ---------------------------------------------------------------------------------------------------
# blockwise: BEiT's generator, written out per sample as its paper's Algorithm 1 and code describe it
# ---------------------------------------------------------------------------------------------------


def beit_masked_cells(
    rows: int, cols: int, budget: int, min_block: int, min_aspect: float, rng: random.Random
):
    """One mask of BEiT's blockwise generator, a set of (row, col), the open budget then filled at random."""
    masked: set[tuple[int, int]] = set()
    while len(masked) < budget:
        room, added = budget - len(masked), 0
        for _ in range(10):
            area = rng.uniform(min_block, room)
            aspect = math.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect)))
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if height < rows and width < cols:
                top, left = rng.randint(0, rows - height), rng.randint(0, cols - width)
                block = {(r, c) for r in range(top, top + height) for c in range(left, left + width)}
                if 0 < len(block - masked) <= room:
                    added = len(block - masked)
                    masked |= block
            if added:
                break
        if not added:
            break
    unmasked = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in masked]
    return masked | set(rng.sample(unmasked, budget - len(masked)))


def mask_shape_statistics(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per sample [N, rows, cols]: both-masked horizontal and vertical neighbour pairs (contiguity and its
    orientation, which the aspect ratios set), and rows or columns masked from edge to edge."""
    return {
        "horizontal pairs": (mask[:, :, 1:] & mask[:, :, :-1]).sum(axis=(1, 2)),
        "vertical pairs": (mask[:, 1:] & mask[:, :-1]).sum(axis=(1, 2)),
        "full lines": mask.all(axis=2).sum(axis=1) + mask.all(axis=1).sum(axis=1),
    }


@pytest.mark.parametrize(
    ("grid", "keep_ratio", "min_block"), [((8, 8), 0.5, 16), ((14, 14), 0.6, 16), ((6, 9), 0.5, 4)]
)
def test_blockwise_matches_beits_generator(grid, keep_ratio, min_block):
    rows, cols = grid
    masking, draws = BlockwiseMasking(keep_ratio=keep_ratio, min_block=min_block), 1500
    budget = rows * cols - masking.num_kept_cells(grid)
    keep = masking.select(None, grid, draws, generator=torch.Generator().manual_seed(0))
    ours = np.ones((draws, rows * cols), dtype=bool)
    np.put_along_axis(ours, keep.numpy(), False, axis=1)
    ours = ours.reshape(draws, rows, cols)
    rng = random.Random(0)
    reference = np.zeros((draws, rows, cols), dtype=bool)
    for sample in range(draws):
        for r, c in beit_masked_cells(rows, cols, budget, min_block, 0.3, rng):
            reference[sample, r, c] = True
    # Where blocks fall: each cell's masking frequency.
    p, q = ours.mean(axis=0), reference.mean(axis=0)
    pooled = (p + q) / 2
    assert np.all(np.abs(p - q) <= Z * np.sqrt(pooled * (1 - pooled) * 2 / draws) + 1e-3)
    # The blocks' shapes: the same contiguity, orientation and edge-to-edge lines.
    ours_statistics, reference_statistics = mask_shape_statistics(ours), mask_shape_statistics(reference)
    for name, a in ours_statistics.items():
        b = reference_statistics[name]
        assert abs(a.mean() - b.mean()) <= Z * math.sqrt((a.var() + b.var()) / draws) + 1e-9, name
    # Far more contiguous than random masking.
    pairs = ours_statistics["horizontal pairs"] + ours_statistics["vertical pairs"]
    edges = rows * (cols - 1) + cols * (rows - 1)
    assert pairs.mean() > 1.3 * edges * budget * (budget - 1) / (rows * cols * (rows * cols - 1))


# ---------------------------------------------------------------------------------------------------
# The presets train
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "policy"),
    [("centered", CenteredMasking), ("cluster", ClusterMasking), ("blockwise", BlockwiseMasking)],
)
def test_preset_trains_through_its_policy(train_config, tmp_path, method, policy):
    cfg = train_config(
        f"method={method}", "trainer.max_steps=1", "trainer.log_every_n_steps=1", "evaluation.at_end=false"
    )
    assert cfg.masking._target_ == f"{policy.__module__}.{policy.__name__}" and cfg.data.num_views == 2
    train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        row = next(r for r in csv.DictReader(file) if r.get("train/kept_tokens"))
    assert float(row["train/kept_tokens"]) == 8  # half of the test model's 4 x 4 patches
