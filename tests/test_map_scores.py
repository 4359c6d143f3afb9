"""`map_scores_to_views`: each view reads its patch scores from the enclosing crop's score map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aclip.modules.masking import map_scores_to_views


def random_boxes(batch: int, k: int, generator: torch.Generator, min_size: float = 0.3) -> torch.Tensor:
    """Random (x0, y0, x1, y1) boxes inside [0, 1]^2 with sides of at least `min_size`: [batch, k, 4]."""
    size = min_size + (1 - min_size) * torch.rand(batch, k, 2, generator=generator, dtype=torch.float64)
    start = (1 - size) * torch.rand(batch, k, 2, generator=generator, dtype=torch.float64)
    return torch.cat([start, start + size], dim=-1)


def patch_centres(box: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (x, y) centres of a view's patches, each [gh', gw']."""
    x0, y0, x1, y1 = box.tolist()
    gh, gw = grid
    xs = x0 + (torch.arange(gw, dtype=torch.float64) + 0.5) * (x1 - x0) / gw
    ys = y0 + (torch.arange(gh, dtype=torch.float64) + 0.5) * (y1 - y0) / gh
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return xx, yy


def grid_sample_reference(
    score_map: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Per view: bilinear samples of the map at the view's patch centres (F.grid_sample, border clamp)."""
    rows = []
    for b in range(boxes.shape[0]):
        for v in range(boxes.shape[1]):
            xx, yy = patch_centres(boxes[b, v], grid)
            coords = torch.stack([2 * xx - 1, 2 * yy - 1], dim=-1)[None]  # [1, gh', gw', 2] in [-1, 1]
            value = F.grid_sample(
                score_map[b][None, None].double(),
                coords,
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )
            rows.append(value.flatten())
    return torch.stack(rows)


def resize_crop_resize_reference(
    score_map: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int], pixels_per_cell: int = 16
) -> torch.Tensor:
    """Per view, as an image pipeline would: resize the map to the enclosing crop's pixels, crop the view's
    box (rounded to whole pixels), resize the crop to the view's patch grid."""
    gh, gw = score_map.shape[-2:]
    height, width = gh * pixels_per_cell, gw * pixels_per_cell
    fine = F.interpolate(
        score_map[:, None].double(), size=(height, width), mode="bilinear", align_corners=False
    )
    rows = []
    for b in range(boxes.shape[0]):
        for v in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[b, v].tolist()
            left, right = round(x0 * width), round(x1 * width)
            top, bottom = round(y0 * height), round(y1 * height)
            crop = fine[b : b + 1, :, top:bottom, left:right]
            view = F.interpolate(crop, size=grid, mode="bilinear", align_corners=False, antialias=False)
            rows.append(view.flatten())
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("map_grid", "view_grid", "k"),
    [((14, 14), (4, 4), 2), ((7, 7), (14, 14), 3), ((6, 4), (3, 5), 2), ((9, 5), (7, 7), 1)],
)
def test_matches_grid_sample_reference(map_grid, view_grid, k):
    generator = torch.Generator().manual_seed(0)
    batch = 3
    score_map = torch.rand(batch, *map_grid, generator=generator)
    boxes = random_boxes(batch, k, generator)
    out = map_scores_to_views(score_map, boxes.float(), view_grid)
    assert out.shape == (batch * k, view_grid[0] * view_grid[1])
    assert out.dtype == torch.float32
    expected = grid_sample_reference(score_map, boxes, view_grid)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("map_grid", "view_grid"), [((14, 14), (14, 14)), ((7, 7), (14, 14)), ((6, 4), (3, 5))]
)
def test_matches_resize_crop_resize_reference(map_grid, view_grid):
    generator = torch.Generator().manual_seed(1)
    batch, k = 2, 3
    # A smooth map (a coarse map upsampled), as attention scores tend to be.
    coarse = torch.rand(batch, 1, 3, 3, generator=generator)
    score_map = F.interpolate(coarse, size=map_grid, mode="bilinear", align_corners=False)[:, 0]
    boxes = random_boxes(batch, k, generator, min_size=0.5)
    out = map_scores_to_views(score_map, boxes.float(), view_grid)
    expected = resize_crop_resize_reference(score_map, boxes, view_grid)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


def test_full_box_on_same_grid_is_identity():
    generator = torch.Generator().manual_seed(2)
    score_map = torch.rand(2, 6, 4, generator=generator)
    boxes = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, 3, 4)
    out = map_scores_to_views(score_map, boxes, (6, 4))
    expected = score_map.repeat_interleave(3, dim=0).flatten(1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_half_maps():
    # Left half 1, right half 0 (8 columns): a view inside either half reads that half's value.
    score_map = torch.zeros(1, 8, 8)
    score_map[..., :4] = 1
    boxes = torch.tensor([[[0.0, 0.1, 0.4, 0.9], [0.6, 0.0, 1.0, 1.0]]])
    out = map_scores_to_views(score_map, boxes, (3, 2)).reshape(2, 3, 2)
    torch.testing.assert_close(out[0], torch.ones(3, 2))
    torch.testing.assert_close(out[1], torch.zeros(3, 2))

    # The same on a non-square map split along y (top 3 of 6 rows are 1): catches an x/y swap.
    score_map = torch.zeros(1, 6, 4)
    score_map[:, :3] = 1
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 0.4], [0.0, 0.6, 1.0, 1.0], [0.0, 0.0, 0.4, 1.0]]])
    out = map_scores_to_views(score_map, boxes, (2, 5)).reshape(3, 2, 5)
    torch.testing.assert_close(out[0], torch.ones(2, 5))
    torch.testing.assert_close(out[1], torch.zeros(2, 5))
    # A tall box on the left covers both halves: its top row reads 1, its bottom row 0.
    torch.testing.assert_close(out[2, 0], torch.ones(5))
    torch.testing.assert_close(out[2, 1], torch.zeros(5))


def test_linear_map_exact_and_oriented():
    # s(row i, col j) = i + 10 j on a 6 x 4 map: bilinear interpolation is exact between cell centres, so
    # a patch centred at (x, y) grid units reads (y - 0.5) + 10 (x - 0.5). Non-square map and view grids.
    gh, gw = 6, 4
    rows = torch.arange(gh, dtype=torch.float64)[:, None]
    cols = torch.arange(gw, dtype=torch.float64)[None, :]
    score_map = (rows + 10 * cols)[None]
    box = torch.tensor([0.2, 0.1, 0.9, 0.7], dtype=torch.float64)  # centres stay within [0.5, g - 0.5]
    view_grid = (2, 3)
    out = map_scores_to_views(score_map, box[None, None], view_grid)
    assert out.dtype == torch.float64
    xx, yy = patch_centres(box, view_grid)
    expected = (yy * gh - 0.5) + 10 * (xx * gw - 0.5)
    torch.testing.assert_close(out.reshape(view_grid), expected, atol=1e-10, rtol=0)


def test_rows_are_sample_major():
    batch, k = 2, 3
    # Sample b's map is constant b + 1 plus a column ramp; view v's box is a thin strip at column v + 1.
    cols = torch.arange(5, dtype=torch.float32)
    score_map = torch.stack([(b + 1) * 100 + cols.expand(4, 5) for b in range(batch)])
    boxes = torch.tensor([[(v + 1) / 5, 0.0, (v + 2) / 5, 1.0] for v in range(k)]).expand(batch, k, 4)
    out = map_scores_to_views(score_map, boxes, (2, 1))
    expected = torch.tensor(
        [(b + 1) * 100 + v + 1 for b in range(batch) for v in range(k)], dtype=torch.float32
    )
    torch.testing.assert_close(out, expected[:, None].expand(batch * k, 2))


def _check_low_precision(device: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    score_map = torch.rand(2, 7, 7, generator=generator)
    boxes = random_boxes(2, 2, generator).float()
    out = map_scores_to_views(score_map.to(device, dtype), boxes.to(device), (14, 14))
    assert out.dtype == dtype and out.device.type == device
    expected = map_scores_to_views(score_map.to(dtype).float(), boxes, (14, 14))
    torch.testing.assert_close(out.float().cpu(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(dtype):
    _check_low_precision("cpu", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda(dtype):
    _check_low_precision("cuda", dtype)


def test_boxes_moved_to_map_device_and_dtype():
    score_map = torch.rand(1, 4, 4, dtype=torch.float64)
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]], dtype=torch.float16)
    torch.testing.assert_close(map_scores_to_views(score_map, boxes, (4, 4)), score_map.flatten(1))


def test_empty_views():
    out = map_scores_to_views(torch.rand(2, 4, 4), torch.zeros(2, 0, 4), (3, 3))
    assert out.shape == (0, 9)


@pytest.mark.parametrize(
    ("score_map", "boxes", "grid"),
    [
        (torch.rand(2, 16), torch.zeros(2, 1, 4), (4, 4)),  # flat map
        (torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4), (4, 4)),  # 4-D map
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 1, 4), (4, 4)),  # integer map
        (torch.rand(2, 0, 4), torch.zeros(2, 1, 4), (4, 4)),  # empty map grid
        (torch.rand(2, 4, 4), torch.zeros(2, 4), (4, 4)),  # boxes not [B, k, 4]
        (torch.rand(2, 4, 4), torch.zeros(3, 1, 4), (4, 4)),  # batch mismatch
        (torch.rand(2, 4, 4), torch.zeros(2, 1, 3), (4, 4)),  # not 4 coordinates
        (torch.rand(2, 4, 4), [[0, 0, 1, 1]], (4, 4)),  # not a tensor
        (torch.rand(2, 4, 4), torch.zeros(2, 1, 4), (0, 4)),  # empty view grid
        (torch.rand(2, 4, 4), torch.zeros(2, 1, 4), (4, -1)),
        (torch.rand(2, 4, 4), torch.zeros(2, 1, 4), (4,)),
        (torch.rand(2, 4, 4), torch.zeros(2, 1, 4), (4, 2.5)),
        (torch.rand(2, 4, 4), torch.zeros(2, 1, 4), 4),
    ],
)
def test_bad_shapes_raise(score_map, boxes, grid):
    with pytest.raises(ValueError):
        map_scores_to_views(score_map, boxes, grid)
