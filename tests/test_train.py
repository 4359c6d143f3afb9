"""End-to-end training and evaluation on the built-in dataset with a tiny model."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from aclip.cli import run_training
from aclip.errors import ConfigError
from aclip.modules.aclip import AClip
from aclip.modules.model import MAX_LOGIT_SCALE
from aclip.tasks import evaluate_checkpoint, train
from aclip.trained import load_checkpoint
from tests.helpers import (
    SYNTHETIC_EVAL_OVERRIDES,
    compose_config,
)

EXPECTED_KEYS = {
    "zeroshot/synthetic/reported",  # the paper's figure for the set: its top-1
    "zeroshot/synthetic/top1",
    "zeroshot/synthetic/top5",
    "zeroshot/synthetic/mean_per_class_recall",
    *(f"retrieval/synthetic/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
}


def read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_fast_dev_run_trains_and_evaluates(train_config, tmp_path):
    cfg = train_config("debug=fast_dev_run")
    metrics = train(cfg)
    assert list(metrics) == ["ema", "online"]  # the reported model (EMA by default) first
    for results in metrics.values():
        assert set(results) == EXPECTED_KEYS
        assert all(0.0 <= value <= 100.0 for value in results.values())
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written.keys() == metrics.keys()
    for name in metrics:
        assert written[name] == pytest.approx(metrics[name])


def test_logit_scale_clamped_after_each_optimizer_step(train_config):
    cfg = train_config("debug=fast_dev_run", "evaluation.at_end=false", "+model.init_logit_scale=5.0")
    module = instantiate(cfg.model)
    assert module.model.logit_scale.item() == pytest.approx(5.0)
    trainer = instantiate(cfg.trainer, logger=False)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert module.model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


SGD = [
    "model.optimizer._target_=torch.optim.SGD",
    "~model.optimizer.betas",
    "~model.optimizer.eps",
    "+model.optimizer.momentum=0.9",
]


@pytest.mark.parametrize(("optimizer", "overrides"), [(torch.optim.AdamW, []), (torch.optim.SGD, SGD)])
def test_no_weight_decay_on_biases_norms_and_logit_scale(train_config, optimizer, overrides):
    """Whichever torch optimizer the `model.optimizer` node names, over the same two parameter groups."""
    cfg = train_config("debug=fast_dev_run", "evaluation.at_end=false", *overrides)
    module = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, logger=False)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert type(trainer.optimizers[0]) is optimizer
    decay, no_decay = trainer.optimizers[0].param_groups
    assert decay["weight_decay"] == cfg.model.optimizer.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(module.model.named_parameters())
    assert id(named["logit_scale"]) in no_decay_ids
    assert id(named["vision.trunk.blocks.0.norm1.weight"]) in no_decay_ids
    assert id(named["vision.trunk.blocks.0.attn.qkv.bias"]) in no_decay_ids
    assert id(named["vision.trunk.blocks.0.attn.qkv.weight"]) not in no_decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_training_logs_and_lowers_the_loss(train_config, tmp_path):
    """Two epochs of 16 steps: the logged loss falls, and lr and logit scale are logged per step."""
    cfg = train_config(
        "data.train.size=128",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "evaluation.at_end=false",
        "model.scheduler.warmup_epochs=0.5",
    )
    train(cfg)
    rows = [row for row in read_csv_metrics(tmp_path / "run") if row.get("train/loss")]
    assert len(rows) == 32  # 128 samples / batch 8 x 2 epochs
    losses = [float(row["train/loss"]) for row in rows]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3
    lrs = [float(row["train/lr"]) for row in rows]
    assert lrs[0] == pytest.approx(cfg.model.scheduler.warmup_start_lr)  # warm-up starts low
    assert max(lrs) == pytest.approx(cfg.model.optimizer.lr, rel=0.05)  # reaches the peak after 8 steps
    assert lrs[-1] < 0.1 * cfg.model.optimizer.lr  # cosine decay towards min_lr
    assert all(0 <= float(row["train/logit_scale"]) <= MAX_LOGIT_SCALE + 1e-6 for row in rows)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_train_then_evaluate_round_trip(train_config, tmp_path):
    cfg = train_config("trainer.limit_train_batches=2")
    trained = train(cfg)
    logged = {key: value for row in read_csv_metrics(tmp_path / "run") for key, value in row.items() if value}
    assert float(logged["eval/zeroshot/synthetic/top1"]) == pytest.approx(
        trained["ema"]["zeroshot/synthetic/top1"]
    )
    assert float(logged["eval/online/zeroshot/synthetic/top1"]) == pytest.approx(
        trained["online"]["zeroshot/synthetic/top1"]
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    eval_overrides = [*SYNTHETIC_EVAL_OVERRIDES, "evaluation.loader.batch_size=32"]
    eval_cfg = compose_config("eval", [*eval_overrides, f"ckpt_path={checkpoint}"], tmp_path / "eval")
    evaluated = evaluate_checkpoint(eval_cfg)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("ema", "online"):
        assert evaluated[name] == pytest.approx(trained[name], abs=1e-4)
        assert written[name] == pytest.approx(evaluated[name])
    # ... and sent to the active logger.
    eval_logged = {k: v for row in read_csv_metrics(tmp_path / "eval") for k, v in row.items() if v}
    assert float(eval_logged["eval/zeroshot/synthetic/top1"]) == pytest.approx(
        evaluated["ema"]["zeroshot/synthetic/top1"]
    )
    # The checkpoint alone rebuilds the architecture (no config file needed).
    module = load_checkpoint(checkpoint)
    assert module.hparams.vision["image_size"] == 32


def test_evaluate_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize(
    "content",
    [
        b"not a checkpoint",
        {"state_dict": {"weight": torch.zeros(2)}},
        {"hyper_parameters": {}, "state_dict": {}},
    ],
)
def test_evaluate_incompatible_checkpoint(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match="is not a checkpoint of aclip's model"):
        load_checkpoint(path)


def test_checkpoint_loads_without_unpickling_objects(train_config, tmp_path):
    """Checkpoints hold only tensors and plain containers, so `weights_only` loading accepts them."""
    train(train_config("trainer.limit_train_batches=1", "evaluation.at_end=false"))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert isinstance(checkpoint["hyper_parameters"]["vision"], dict)


# The evaluation set of a user's own data: its metrics are zeroshot/mine/*, not the default
# optimized_metric's zeroshot/synthetic/top1.
OWN_EVALUATION = [
    "+evaluation.sets.synthetic.name=mine",
    "trainer.limit_train_batches=2",
    "evaluation.every_n_steps=null",
]


def test_a_run_on_its_own_evaluation_set_succeeds_without_the_default_optimized_metric(
    train_config, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING):
        assert run_training(train_config(*OWN_EVALUATION, output_dir=tmp_path / "run")) is None
    assert "optimized_metric=zeroshot/synthetic/top1 is not among the evaluation's metrics" in caplog.text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "zeroshot/mine/top1" in metrics["ema"]


def test_an_optimising_sweep_checks_its_metric_before_training(train_config, monkeypatch):
    def unreachable(*args, **kwargs):
        raise AssertionError("the model was built before optimized_metric was checked")

    monkeypatch.setattr(AClip, "__init__", unreachable)
    with pytest.raises(
        ConfigError, match=r"optimized_metric=zeroshot/synthetic/top1, which no eval set.*mine"
    ):
        run_training(train_config("hparams_search=optuna_lr", *OWN_EVALUATION))
    with pytest.raises(ConfigError, match=r"evaluation\.at_end=false reports no metric"):
        run_training(train_config("hparams_search=optuna_lr", "evaluation.at_end=false"))
