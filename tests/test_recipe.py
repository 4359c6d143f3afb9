"""The tiny default recipe learns at once, on the built-in data and on its harder variant it was not
tuned on: the CLIP loss leaves the ln(batch) plateau of an untrained model within the first epoch."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from tests.helpers import run_train_py


def logged(run_dir: Path, metric: str) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as file:
        return [float(row[metric]) for row in csv.DictReader(file) if row.get(metric)]


# Measured 2026-12-01: on glyphs the tiny recipe's CLIP loss stays at ln(128) for the whole first epoch
# (every logged step between 4.848 and 4.857); no change of learning rate, warm-up, weight decay,
# temperature, pooling, pre-norm or batch size alone brings it below the bar (docs/attentive_stability.md,
# section 5). Xavier layers (`model.vision.weight_init=jax`) make the escape start in every seed tried but
# reach 4.45 at best at batch 128; the recipe that learns glyphs at once is still to be found.
GLYPHS_PLATEAU = pytest.mark.xfail(
    strict=True, reason="the tiny recipe does not leave the ln(B) plateau within one epoch of glyphs yet"
)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["synthetic", pytest.param("glyphs", marks=GLYPHS_PLATEAU)])
def test_one_epoch_of_the_default_recipe_leaves_the_loss_plateau(tmp_path, data):
    # The default run as a user starts it (one epoch, batch 128), on either built-in variant.
    run_train_py(f"data={data}", f"eval=[{data}]", "evaluation.at_end=false", cwd=tmp_path, timeout=1200)
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    losses = logged(run_dir, "train/clip_loss")
    plateau = math.log(128)  # the loss of a model that cannot tell the batch's captions apart
    assert sum(losses[-3:]) / 3 < 0.9 * plateau, losses  # left behind by the end of the first epoch
