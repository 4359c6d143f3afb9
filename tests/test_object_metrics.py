"""Object recall and score mass: the oracle a teacher can be measured against, on the built-in data."""

from __future__ import annotations

import pytest
import torch

from aclip.callbacks.mask_vis import outline_objects
from aclip.datamodules.synthetic import SyntheticCaptions
from aclip.modules.masking import AttentiveLow, RandomMasking
from aclip.modules.object_metrics import object_diagnostics, object_recall, object_score_mass, patch_coverage

GRID = (8, 8)


@pytest.fixture(scope="module")
def coverage() -> torch.Tensor:
    """Patch coverage [64, 64] of 64 built-in scenes' captioned objects on an 8 x 8 grid."""
    data = SyntheticCaptions(size=64, image_size=64, seed=3, object_masks=True)
    masks = torch.stack([data[i][2]["object_mask"] for i in range(len(data))])
    return patch_coverage(masks, GRID)


def test_with_the_object_as_its_scores_attentive_low_keeps_every_object_patch_the_budget_allows(coverage):
    policy = AttentiveLow(keep_ratio=0.5)
    budget = policy.num_keep(GRID)
    keep = policy.select(coverage, GRID, batch=len(coverage))

    kept_object_patches = (coverage.gather(1, keep) > 0).sum(1)
    object_patches = (coverage > 0).sum(1)
    assert torch.equal(kept_object_patches, object_patches.clamp(max=budget))
    fits = object_patches <= budget
    assert fits.any() and torch.allclose(object_recall(coverage, keep)[fits], torch.ones(int(fits.sum())))


def test_random_masking_keeps_about_keep_ratio_of_the_object(coverage):
    generator = torch.Generator().manual_seed(0)
    repeated = coverage.repeat(8, 1)
    keep = RandomMasking(keep_ratio=0.25).select(None, GRID, batch=len(repeated), generator=generator)

    recall = object_recall(repeated, keep)
    assert recall.mean().item() == pytest.approx(0.25, abs=0.02)
    assert recall.std() > 0.05  # a draw, not a fixed pattern


def test_score_mass_is_the_object_area_for_even_scores_and_one_for_scores_on_the_object(coverage):
    even = torch.ones_like(coverage)
    assert torch.allclose(object_score_mass(even, coverage), coverage.mean(1))
    on_object = (coverage == 1).float()
    whole = on_object.sum(1) > 0
    assert torch.allclose(object_score_mass(on_object, coverage)[whole], torch.ones(int(whole.sum())))


def test_diagnostics_leave_out_views_without_objects():
    masks = torch.zeros(1, 2, 16, 16, dtype=torch.uint8)
    masks[0, 0, :8, :8] = 255  # view 0: the object fills the top-left patch of a 2 x 2 grid
    keep = torch.tensor([[0], [1]])
    metrics = object_diagnostics(masks, keep, (2, 2))
    assert metrics["object_recall"].item() == 1.0  # view 1 shows no object: not counted as 0


def test_mask_pictures_outline_the_object():
    images = torch.zeros(1, 3, 32, 32)
    mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
    mask[0, 4:12, 4:12] = 255  # pixels 8..23 at the picture's size
    drawn = outline_objects(images, mask)

    yellow = (drawn[0, 0] == 1) & (drawn[0, 1] == 1) & (drawn[0, 2] == 0)
    assert yellow[7, 8:24].all() and yellow[8:24, 24].all()  # just outside the object, all round
    assert not yellow[8:24, 8:24].any() and not yellow[0].any()  # not inside it, not far from it
    assert torch.equal(outline_objects(images, None), images)
