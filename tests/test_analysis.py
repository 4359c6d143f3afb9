"""The teacher-at-initialisation analysis measures what it says on the real module and data."""

from __future__ import annotations

import pytest
import torch

from analysis import teacher_at_init


def test_agreement_is_one_for_the_same_positions_and_about_a_third_for_random_halves():
    same = torch.tensor([[0, 1, 2, 3]] * 5)
    assert teacher_at_init.jaccard_agreement(same, 8) == 1.0
    generator = torch.Generator().manual_seed(0)
    halves = torch.stack([torch.randperm(64, generator=generator)[:32] for _ in range(200)])
    assert abs(teacher_at_init.jaccard_agreement(halves, 64) - 1 / 3) < 0.01


def test_the_untrained_teachers_recall_differs_from_randoms_and_depends_on_the_seed():
    text = teacher_at_init.main(["--seeds", "1", "3", "--set", "data.batch_size=64"])
    rows = {
        int(cells[1]): [float(c) for c in cells[2:-1]]
        for cells in (
            line.split("|") for line in text.splitlines() if line.startswith("| ") and "seed" not in line
        )
        if cells[1].strip().isdigit()
    }
    (recall1, random1, *_), (recall3, random3, *_) = rows[1], rows[3]
    assert abs(random1 - 0.5) < 0.06 and abs(random3 - 0.5) < 0.06  # random masking keeps half the object
    assert recall1 < 0.3 and recall3 > 0.7  # seed 1's teacher avoids the object, seed 3's seeks it
    for *_, image_similarity, text_similarity in rows.values():
        # Untrained towers map different inputs close together, images closer than captions.
        assert 0.5 < text_similarity < image_similarity < 1


def test_mean_similarity_is_one_for_equal_rows_and_zero_for_orthogonal_ones():
    assert teacher_at_init.mean_similarity(torch.ones(4, 3) / 3**0.5) == pytest.approx(1.0)
    assert teacher_at_init.mean_similarity(torch.eye(5)) == 0.0
