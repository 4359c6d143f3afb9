"""MultiViewTransform: k random crops, the clean enclosing crop for the EMA encoder, and exact boxes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from aclip.datamodules.transforms import MultiViewTransform


def smooth_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Non-square image whose channels vary differently along x and y: R with x, G with y, B smooth noise."""
    xs = np.linspace(0.0, 1.0, width)[None, :].repeat(height, 0)
    ys = np.linspace(0.0, 1.0, height)[:, None].repeat(width, 1)
    noise = np.random.default_rng(seed).random((4, 6))
    blue = np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    rgb = np.stack([xs * 255, ys * 255, blue.astype(np.float64)], axis=-1)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def sample_box(ema: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly sample the [3, E, E] image over a normalised (x0, y0, x1, y1) box at size x size."""
    x0, y0, x1, y1 = box.tolist()
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    gx = x0 + (x1 - x0) * centres
    gy = y0 + (y1 - y0) * centres
    grid_y, grid_x = torch.meshgrid(gy, gx, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1)[None] * 2 - 1  # grid_sample wants (x, y) in [-1, 1]
    return torch.nn.functional.grid_sample(ema[None], grid, mode="bilinear", align_corners=False)[0]


def test_enclosing_crop_contains_every_view_and_is_minimal() -> None:
    rng = random.Random(0)
    for draw in range(300):
        torch.manual_seed(draw)
        width, height = rng.randint(8, 120), rng.randint(8, 120)
        k = rng.randint(1, 4)
        scale_low = rng.choice([0.05, 0.2, 0.5])
        transform = MultiViewTransform(8, num_views=k, crop_scale=(scale_low, 1.0), ema_image_size=8)
        boxes = transform(Image.new("RGB", (width, height)))["boxes"]
        assert boxes.shape == (k, 4) and boxes.dtype == torch.float32
        assert torch.all((boxes >= 0) & (boxes <= 1)), (draw, boxes)
        assert torch.all(boxes[:, 0] < boxes[:, 2]) and torch.all(boxes[:, 1] < boxes[:, 3]), boxes
        assert boxes[:, 0].min() == 0 and boxes[:, 1].min() == 0, boxes
        assert boxes[:, 2].max() == 1 and boxes[:, 3].max() == 1, boxes
        if k == 1:
            assert boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_views_are_the_ema_crop_at_their_boxes() -> None:
    """Sampling the EMA image over a view's box reproduces the view: boxes are in the right frame."""
    image = smooth_image(96, 64)
    transform = MultiViewTransform(32, num_views=3, crop_scale=(0.2, 0.6), ema_image_size=64)
    errors, swapped_errors = [], []
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(image)
        ema = out["ema_image"].float() / 255  # uint8 pixels (the vision tower normalises them)
        for view, box in zip(out["images"].float() / 255, out["boxes"], strict=True):
            errors.append((sample_box(ema, box, 32) - view).abs().mean().item())
            swapped = box[[1, 0, 3, 2]]  # x and y exchanged
            swapped_errors.append((sample_box(ema, swapped, 32) - view).abs().mean().item())
    assert max(errors) < 0.01, max(errors)
    assert np.mean(errors) < 0.005, np.mean(errors)
    assert np.mean(swapped_errors) > 10 * np.mean(errors), (np.mean(swapped_errors), np.mean(errors))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_output_shapes_and_dtypes(k: int) -> None:
    torch.manual_seed(0)
    out = MultiViewTransform(32, num_views=k)(smooth_image(80, 50))
    assert set(out) == {"images", "ema_image", "boxes"}
    assert out["images"].shape == (k, 3, 32, 32) and out["images"].dtype == torch.uint8
    assert out["ema_image"].shape == (3, 32, 32) and out["ema_image"].dtype == torch.uint8
    assert out["boxes"].shape == (k, 4) and out["boxes"].dtype == torch.float32


def test_ema_image_size_can_differ_from_views() -> None:
    torch.manual_seed(0)
    out = MultiViewTransform(32, num_views=2, ema_image_size=16)(smooth_image())
    assert out["images"].shape == (2, 3, 32, 32)
    assert out["ema_image"].shape == (3, 16, 16)


def test_single_view_is_the_ema_image() -> None:
    image = smooth_image()
    transform = MultiViewTransform(32, num_views=1)
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform(image)
        assert out["boxes"].tolist() == [[0.0, 0.0, 1.0, 1.0]]
        assert torch.equal(out["images"][0], out["ema_image"])


def test_views_are_independent_crops() -> None:
    torch.manual_seed(0)
    out = MultiViewTransform(32, num_views=2, crop_scale=(0.1, 0.5))(smooth_image())
    assert not torch.equal(out["boxes"][0], out["boxes"][1])
    assert not torch.allclose(out["images"][0], out["images"][1])


def test_colour_jitter_changes_views_but_not_the_ema_image() -> None:
    image = smooth_image()
    plain = MultiViewTransform(32, num_views=2)
    jittered = MultiViewTransform(32, num_views=2, augment={"color_jitter_p": 0.8})
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        a = plain(image)
        torch.manual_seed(seed)
        b = jittered(image)
        # Crops are drawn before any colour augmentation, so the same seed gives the same crops.
        assert torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["ema_image"], b["ema_image"])
        changed += int((a["images"].float() - b["images"].float()).abs().mean() > 0.25)
    assert changed >= 5  # jitter is applied with probability 0.8 per view


def test_blur_changes_views_but_not_the_ema_image() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    torch.manual_seed(0)
    a = MultiViewTransform(32, num_views=2)(image)
    torch.manual_seed(0)
    b = MultiViewTransform(32, num_views=2, augment={"blur_p": 1.0})(image)
    assert torch.equal(a["ema_image"], b["ema_image"])
    assert torch.equal(a["boxes"], b["boxes"])
    assert b["images"].float().std() < a["images"].float().std()  # blur smooths noise


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size"),
        ({"num_views": 0}, "num_views"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale must satisfy 0 < low <= high <= 1"),
        ({"crop_scale": (0.8, 0.5)}, "crop_scale must satisfy 0 < low <= high <= 1"),
        ({"crop_scale": (0.5, 1.5)}, "crop_scale must satisfy 0 < low <= high <= 1"),
        ({"crop_ratio": (0.0, 1.0)}, "crop_ratio"),
        ({"crop_ratio": (4 / 3, 3 / 4)}, "crop_ratio"),
        ({"ema_image_size": 0}, "ema_image_size"),
        ({"augment": {"color_jitter": [-0.1, 0, 0, 0]}}, "augment.color_jitter"),
        ({"augment": {"color_jitter": [0.4, 0.4, 0.2]}}, "augment.color_jitter"),
        ({"augment": {"blur_p": -0.1}}, "augment.blur_p"),
        ({"augment": {"solarize_p": 1.5}}, "augment.solarize_p"),
        ({"augment": {"blur_sigma": [2.0, 0.1]}}, "augment.blur_sigma"),
        ({"interpolation": "nearest"}, "interpolation"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiViewTransform(**{"image_size": 32, **kwargs})
