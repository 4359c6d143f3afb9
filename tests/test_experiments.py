"""The paper's method presets at laptop scale: multi-view A-CLIP steps and the mask pictures."""

from __future__ import annotations

import pytest
from PIL import Image

from aclip.tasks import train
from tests.helpers import CONF_DIR

# A second stage (`_finetune`) needs its first stage's run: tests/test_clipa.py runs the pair.
TINY_PRESETS = sorted(
    p.stem for p in (CONF_DIR / "experiment").glob("tiny_*.yaml") if not p.stem.endswith("_finetune")
)


def test_every_paper_preset_has_a_laptop_twin_for_the_comparison():
    assert TINY_PRESETS == [
        "tiny_aclip",
        "tiny_aclip_eff",
        "tiny_attentive_2x50",
        "tiny_clip",
        "tiny_clipa",
        "tiny_random_2x50",
    ]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_train(train_config, preset):
    # The preset's own model and data sizes are shrunk further by the test overrides that follow it.
    metrics = train(train_config(f"experiment={preset}", "debug=fast_dev_run"))
    assert set(metrics) == {"ema", "online"}


@pytest.mark.parametrize(("method", "losses"), [("aclip", {"simclr", "byol"}), ("attentive_3x33", set())])
def test_multi_view_steps_log_every_loss(train_config, tmp_path, method, losses):
    """A-CLIP's step (k = 2, SimCLR + BYOL) and a k = 3 step run and log each loss component."""
    import csv

    train(
        train_config(
            f"method={method}", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "evaluate=false"
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


def test_mask_pictures_written(train_config, tmp_path):
    train(
        train_config(
            "method=aclip", "trainer.max_steps=3", "callbacks.mask_pictures.every_n_steps=2", "evaluate=false"
        )
    )
    pictures = sorted((tmp_path / "run" / "mask_pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["step0000000.png", "step0000002.png"]
    with Image.open(pictures[0]) as picture:
        # 4 samples (rows) x (EMA crop + 2 views) tiles of 128 px with 2 px padding.
        assert picture.size == (3 * 130 + 2, 4 * 130 + 2)
