"""Scales and methods compose: the methods at laptop scale, multi-view A-CLIP steps and the mask pictures."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from aclip.callbacks import mask_vis
from aclip.errors import ConfigError
from aclip.renamed import check_overrides, translate
from aclip.tasks import train
from tests.helpers import compose_config

# The main results' methods at the default (tiny) scale, and CLIPA's laptop stage 1 (its stage 2 needs
# the first stage's run: tests/test_clipa.py runs the pair).
LAPTOP_RUNS = [
    "method=clip",
    "method=random_2x50",
    "method=attentive_2x50",
    "method=aclip",
    "method=aclip_eff",
    "experiment=tiny_clipa",
]


@pytest.mark.parametrize("choice", LAPTOP_RUNS)
def test_methods_train_at_laptop_scale(train_config, choice):
    # The run's own model and data sizes are shrunk further by the test overrides that follow it.
    metrics = train(train_config(choice, "debug=fast_dev_run"))
    assert set(metrics) == {"ema", "online"}


@pytest.mark.parametrize("name", ["aclip", "aclip_eff", "clip"])
def test_a_short_name_is_the_paper_scale_with_its_method(tmp_path, name):
    """A paper row is a method: `experiment=<row>`, the short name of earlier versions, stops naming the
    pair, and a checkpoint that recorded it resumes with the pair (aclip/renamed.py)."""
    with pytest.raises(ConfigError, match=f"give experiment=paper method={name}$"):
        check_overrides([f"experiment={name}"])
    spelled = compose_config("train", translate([f"experiment={name}"]), tmp_path)
    choices = spelled.hydra.runtime.choices
    assert (choices.experiment, choices.method) == ("paper", name)
    assert spelled.model.vision.patch_size == 16 and spelled.data.batch_size == 4096  # the paper's scale


@pytest.mark.parametrize("data", ["synthetic", "glyphs", "csv", "webdataset", "coco", "yfcc15m"])
def test_the_laptop_scale_sets_the_batch_whatever_the_data(tmp_path, data):
    """The scale owns the batch and the loader: a first run on one's own files (`data=csv`) at the default
    scale trains at the laptop's batch, not at the paper's 4096 with 8 workers."""
    composed = compose_config("train", [f"data={data}"], tmp_path)
    assert (composed.data.batch_size, composed.data.num_workers) == (128, 2)
    paper = compose_config("train", ["experiment=paper", f"data={data}"], tmp_path)
    assert (paper.data.batch_size, paper.data.num_workers) == (4096, 8)


@pytest.mark.parametrize(("method", "losses"), [("aclip", {"simclr", "byol"}), ("attentive_3x33", set())])
def test_multi_view_steps_log_every_loss(train_config, tmp_path, method, losses):
    """A-CLIP's step (k = 2, SimCLR + BYOL) and a k = 3 step run and log each loss component, every term
    in the loss from the first step as published (the tiny scale's hold-back switched off)."""
    train(
        train_config(
            f"method={method}",
            "model.auxiliary_after_warmup=false",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "evaluation.at_end=false",
        )
    )
    with open(tmp_path / "run" / "csv" / "metrics.csv") as file:
        row = next(r for r in csv.DictReader(file) if r.get("train/loss"))
    logged = {
        key[len("train/") : -len("_loss")] for key, value in row.items() if key.endswith("_loss") and value
    }
    assert logged == {"clip", *losses}
    total = float(row["train/clip_loss"]) + sum(float(row[f"train/{name}_loss"]) for name in losses)
    assert float(row["train/loss"]) == pytest.approx(total, rel=1e-5)


def test_mask_pictures_are_drawn_once_per_accumulated_step(train_config, monkeypatch):
    drawn = []
    monkeypatch.setattr(mask_vis, "save_picture", lambda picture, title, path: drawn.append(Path(path).name))
    train(
        train_config(
            "method=aclip",
            "trainer.max_steps=2",
            "trainer.accumulate_grad_batches=2",
            "callbacks.mask_pictures.every_n_steps=2",
            "evaluation.at_end=false",
        )
    )
    assert drawn == ["step0000000.png"]  # step 0's first micro-batch, not its second


def test_mask_pictures_written(train_config, tmp_path):
    """Titled with the step, the method, its policy and, during the teacher warm-up (step 0 here), the
    random cells; each image 224 px wide."""
    train(
        train_config(
            "method=aclip",
            "model.teacher_warmup_steps=1",
            "model.teacher_warmup_until_loss=null",
            "trainer.max_steps=3",
            "callbacks.mask_pictures.every_n_steps=2",
            "evaluation.at_end=false",
        )
    )
    pictures = sorted((tmp_path / "run" / "mask_pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["step0000000.png", "step0000002.png"]
    policy = "AttentiveLow(keep_ratio=0.5, unit=2, layers='all')"
    titles = []
    for path in pictures:
        with Image.open(path) as picture:
            titles.append(picture.text["Title"])
            # 4 samples (rows) x (EMA crop + 2 views) tiles of 224 px with 2 px padding, under the title.
            width, height = picture.size
            assert width == 3 * 226 + 2 and height > 4 * 226 + 2 + mask_vis.TITLE_FONT_SIZE
    assert titles == [
        f"step 0  ·  method aclip  ·  {policy}  ·  warm-up: random cells until step 1",
        f"step 2  ·  method aclip  ·  {policy}",
    ]
