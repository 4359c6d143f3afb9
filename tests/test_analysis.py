"""The teacher-at-initialisation analysis measures what it says on the real module and data."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aclip.datamodules.csv_source import CsvCaptions
from aclip.datamodules.synthetic import SEGMENT_CLASSNAMES
from analysis import (
    auxiliary_terms,
    export_files,
    masked_evaluation,
    plateau,
    segment_oracle,
    teacher_at_init,
)
from tests.helpers import TINY_OVERRIDES


def test_agreement_is_one_for_the_same_positions_and_about_a_third_for_random_halves():
    same = torch.tensor([[0, 1, 2, 3]] * 5)
    assert teacher_at_init.jaccard_agreement(same, 8) == 1.0
    generator = torch.Generator().manual_seed(0)
    halves = torch.stack([torch.randperm(64, generator=generator)[:32] for _ in range(200)])
    assert abs(teacher_at_init.jaccard_agreement(halves, 64) - 1 / 3) < 0.01


def test_the_untrained_teachers_recall_differs_from_randoms_and_depends_on_the_seed():
    # The tiny model of docs/attentive_stability.md section 1 (ViT's patch projection, timm's layers).
    model = ["--set", "model.vision.stem=patch", "--set", "model.vision.weight_init=''"]
    text = teacher_at_init.main(["--seeds", "1", "3", "--set", "data.batch_size=64", *model])
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


def test_masked_views_keep_the_cells_their_teacher_attends_to_and_the_same_random_cells_for_every_model(
    train_config,
):
    from hydra.utils import instantiate

    from aclip.modules.masking import AttentiveLow, ClusterMasking, RandomMasking

    torch.manual_seed(0)
    module = instantiate(train_config().model)
    model, teacher = module.model.eval(), instantiate(train_config().model).model.vision.eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    grid = model.vision.grid(64)
    with torch.no_grad():
        attentive = masked_evaluation.MaskedViews(model, AttentiveLow(0.5, 2), teacher).encode_image(images)
        scores = teacher.forward_with_cls_attention(images)[1]  # the teacher's, not the model's own
        keep = AttentiveLow(0.5, 2).select(scores, grid, len(images))
        torch.testing.assert_close(attentive, model.encode_image(images, keep))
        assert not torch.allclose(attentive, model.encode_image(images))

        first, second = (masked_evaluation.MaskedViews(model, RandomMasking(0.5, 2), teacher) for _ in "ab")
        batch0 = first.encode_image(images)
        torch.testing.assert_close(second.encode_image(images), batch0)  # the same masks for both models
        assert not torch.allclose(first.encode_image(images), batch0)  # and new masks for the next batch

        # A policy that reads the pixels gets the images'.
        clustered = masked_evaluation.MaskedViews(model, ClusterMasking(), teacher).encode_image(images)
        generator = torch.Generator().manual_seed(0)  # MaskedViews' seed for its first batch
        keep = ClusterMasking().select(None, grid, len(images), generator=generator, pixels=images)
        torch.testing.assert_close(clustered, model.encode_image(images, keep))


def test_the_plateau_probe_splits_the_model_into_its_towers_and_stops_after_its_steps(train_config):
    from hydra.utils import instantiate

    module = instantiate(train_config().model)
    parts = plateau.tower_parts(module)
    counted = [id(p) for parameters in parts.values() for p in parameters]
    assert len(counted) == len(set(counted))  # no parameter counted twice ...
    assert set(counted) | {id(module.model.logit_scale)} == {id(p) for p in module.model.parameters()}

    sizes = [*TINY_OVERRIDES, "data.batch_size=16", "data.train.size=48"]
    text = plateau.main(["--steps", "2", "--every", "1", *(f"--set={override}" for override in sizes)])
    rows = {
        int(cells[1]): [float(c) for c in cells[2:-1]]
        for cells in (line.split("|") for line in text.splitlines() if line.startswith("| "))
        if cells[1].strip().isdigit()
    }
    assert list(rows) == [0, 1, 2]  # it stopped after 2 of the epoch's 3 steps
    for step, (loss, image_cos, text_cos, matched, *grads) in rows.items():
        assert -1 <= image_cos <= 1 and -1 <= text_cos <= 1 and abs(matched) < 1
        if step:
            assert abs(loss - math.log(16)) < 1 and all(g > 0 for g in grads)


def table(text: str) -> tuple[list[str], dict[int, list[float]]]:
    """A probe's printed Markdown table: its column names and its rows by step."""
    lines = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    header, *body = lines
    rows = {int(cells[0]): [float(c) for c in cells[1:]] for cells in body if cells[0].strip().isdigit()}
    return [name.strip() for name in header[1:]], rows


@pytest.mark.parametrize("byol_weight", [2, 0])
def test_the_auxiliary_terms_probe_takes_each_terms_own_trunk_gradient(byol_weight):
    sizes = [*TINY_OVERRIDES, "data.batch_size=16", "data.train.size=48"]
    overrides = [*sizes, f"model.self_supervision.byol_weight={byol_weight}"]
    text = auxiliary_terms.main(["--steps", "2", "--every", "2", *(f"--set={o}" for o in overrides)])
    columns, rows = table(text)
    terms = ["clip", "simclr", "byol"] if byol_weight else ["clip", "simclr"]  # the module's own terms
    spreads = [f"{term} spread" for term in terms[1:]]
    assert columns == [*terms, *(f"grad {t}" for t in terms), *(f"cos clip-{t}" for t in terms[1:]), *spreads]
    (values,) = rows.values()
    named = dict(zip(columns, values, strict=True))
    assert all(named[f"grad {term}"] > 0 for term in terms)
    assert all(-1 <= named[name] <= 1 for name in columns if name.startswith("cos") or "spread" in name)


def test_half_of_a_segment_digits_patches_often_cannot_name_it():
    text = segment_oracle.main(["--samples", "30", "--draws", "2", "--keep-ratios", "1", "0.5"])
    rows = {
        float(cells[1]): float(cells[2])
        for cells in (line.split("|") for line in text.splitlines() if line.startswith("| "))
        if cells[1].strip()[:1].isdigit()
    }
    assert rows[1.0] == 100.0  # the whole digit always names it
    assert rows[0.5] < 60.0  # a random half of its patches, often not


def test_a_variant_exported_as_files_reads_back_through_csv_and_its_zero_shot_set(tmp_path, capsys):
    export_files.main([str(tmp_path), "--pairs", "6", "--per-class", "2"])
    pairs = CsvCaptions(tmp_path / "train.csv")
    assert len(pairs) == 6 and all("digit" in caption for _, caption in (pairs[i][:2] for i in range(6)))
    node = OmegaConf.load(tmp_path / "conf" / "eval" / "segments_files.yaml").segments_files
    held_out = instantiate(node.dataset)
    assert [name.replace("_", " ") for name in held_out.classes] == sorted(SEGMENT_CLASSNAMES)
    assert len(held_out) == 2 * len(SEGMENT_CLASSNAMES)
    command = capsys.readouterr().out
    assert f"data.train.path={tmp_path / 'train.csv'}" in command and "eval=[segments_files]" in command
