"""The `eval` sets during training: Lightning validation every N steps, logged as val/<model>/<metric>."""

from __future__ import annotations

import csv

import pytest

from aclip.tasks import train


def _rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_validation_every_n_steps_logs_learning_curves(train_config, tmp_path):
    """Eight steps with validation every two: four points per model; the last equals the final evaluation
    (same weights, same sets, encoded by Lightning's loop instead of the evaluation's own)."""
    cfg = train_config("data.train.size=64", "evaluation.every_n_steps=2", "callbacks.ema.base_momentum=0.5")
    final = train(cfg)
    rows = _rows(tmp_path / "run")
    for key in (
        "val/zeroshot/synthetic/top1",
        "val/ema/zeroshot/synthetic/top1",
        "val/online/retrieval/synthetic/i2t_R@1",
    ):
        values = [float(row[key]) for row in rows if row.get(key)]
        assert len(values) == 4, key
    last = [row for row in rows if row.get("val/ema/zeroshot/synthetic/top1")][-1]
    for model in ("ema", "online"):
        for metric, value in final[model].items():
            assert float(last[f"val/{model}/{metric}"]) == pytest.approx(value, abs=1e-4), (model, metric)
    # Epoch-end checkpoints are still written while validation runs on its own schedule.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*.ckpt")) == [
        "step0000008.ckpt"
    ]


def test_no_validation_in_fast_dev_run_or_when_off(train_config, tmp_path):
    train(train_config("debug=fast_dev_run", "evaluation.every_n_steps=1", "evaluation.at_end=false"))
    train(
        train_config(
            "evaluation.every_n_steps=null", "evaluation.at_end=false", "trainer.log_every_n_steps=1"
        )
    )
    assert not any(key.startswith("val/") for row in _rows(tmp_path / "run") for key, v in row.items() if v)
