"""Trusting a run: checkpoints are data (no code runs from one), resumes follow the new config, bad inputs
stop a run early with the file or key named."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image

from aclip.callbacks.resume import RUN_CONFIG_KEY, RUN_OVERRIDES_KEY, check_resumed_config
from aclip.checkpointing import CheckpointError, read_checkpoint
from aclip.cli import run_training
from aclip.datamodules.csv_source import CsvCaptions
from aclip.modules.aclip import AClip
from aclip.recompose import compose_resumed
from aclip.tasks import TrainingError, evaluate_checkpoint, train
from aclip.trained import load_checkpoint
from tests.helpers import CONF_DIR, SYNTHETIC_EVAL_OVERRIDES, compose_config
from tests.test_train import read_csv_metrics

QUICK = ["trainer.limit_train_batches=2", "evaluation.at_end=false", "evaluation.every_n_steps=null"]


def unreachable(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the model was built before the input was checked")


@pytest.fixture
def trained(train_config, tmp_path) -> Path:
    """The run directory of a two-step tiny training run."""
    train(train_config(*QUICK, output_dir=tmp_path / "trained"))
    return tmp_path / "trained"


# Pickled objects in both of torch's wordings: a global of a module torch blocks (os), and one it does not
# allow by default.
PAYLOADS = [(os.getcwd, f"{os.getcwd.__module__}.getcwd"), (datetime.date(2026, 1, 1), "datetime.date")]


@pytest.mark.parametrize(("payload", "named"), PAYLOADS, ids=["blocked-module", "not-allowed"])
def test_a_checkpoint_holding_pickled_objects_is_refused_without_advice_to_unpickle(tmp_path, payload, named):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"vision": payload}}, path)
    with pytest.raises(CheckpointError, match=rf"pickled Python object \({re.escape(named)}\)") as raised:
        load_checkpoint(path)
    assert "weights_only" not in str(raised.value)


@pytest.mark.parametrize("key", ["model.vision.init_from", "model.text.init_from"])
def test_init_from_a_file_holding_pickled_objects_names_it_without_advice_to_unpickle(
    tmp_path, train_config, key
):
    payload, named = PAYLOADS[0]
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"weight": torch.zeros(1)}, "extra": payload}, path)
    with pytest.raises(InstantiationException) as raised:
        instantiate(train_config(f"{key}={path}").model)
    message = str(raised.value)
    assert f"{key}={path} cannot be read as weights" in message
    assert f"pickled Python object ({named})" in message
    assert "weights_only" not in message
    not_weights = tmp_path / "weights.safetensors"
    not_weights.write_bytes(b"\xff" * 64)
    with pytest.raises(
        InstantiationException, match=rf"{key}=.*weights\.safetensors cannot be read as weights"
    ):
        instantiate(train_config(f"{key}={not_weights}").model)


def test_a_truncated_checkpoint_is_named_with_the_ones_beside_it(train_config, tmp_path, monkeypatch):
    train(
        train_config(
            "data.train.size=32", "evaluation.at_end=false", "trainer.max_epochs=2", output_dir=tmp_path / "a"
        )
    )
    checkpoints = tmp_path / "a" / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    monkeypatch.setattr(AClip, "__init__", unreachable)
    with pytest.raises(CheckpointError) as raised:
        train(train_config("evaluation.at_end=false", "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'a'}"))
    message = str(raised.value)
    assert str(last) in message and "truncated" in message
    # last.ckpt is a link to step0000008.ckpt: the older file is what is left to resume from.
    assert "a link to step0000008.ckpt" in message
    assert message.endswith("Other checkpoints in its folder, newest first: step0000004.ckpt")


def test_resume_follows_the_new_learning_rate(train_config, tmp_path):
    """Two steps at lr 0.5, resumed with lr 1e-3: the resumed steps use the new rate, not the checkpoint's
    (0.5, not a wilder rate: weights that two steps at lr 20 blew up made the resumed loss NaN on one CPU)."""
    first = tmp_path / "first"
    fast = [
        "model.scheduler.warmup_epochs=0",
        "model.scheduler.min_lr=0",
        "trainer.log_every_n_steps=1",
        "evaluation.at_end=false",
    ]
    fast += ["trainer.max_epochs=5"]  # the step limits end the runs
    train(train_config(*fast, "model.optimizer.lr=0.5", "trainer.max_steps=2", output_dir=first))
    assert float(
        next(row for row in read_csv_metrics(first) if row["train/lr"])["train/lr"]
    ) == pytest.approx(0.5)
    resumed = tmp_path / "resumed"
    train(
        train_config(
            *fast, "model.optimizer.lr=1e-3", "trainer.max_steps=4", f"ckpt_path={first}", output_dir=resumed
        )
    )
    lrs = [float(row["train/lr"]) for row in read_csv_metrics(resumed) if row.get("train/lr")]
    assert len(lrs) == 2 and all(0 < lr <= 1e-3 for lr in lrs)
    optimizer = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    assert all(group["initial_lr"] == 1e-3 for group in optimizer["param_groups"])
    # The step time of the resumed run counts its own two steps.
    assert json.loads((resumed / "timing.json").read_text())["optimizer_steps"] == 2


def test_resume_lists_changed_keys_and_refuses_another_model(trained, train_config, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        train(train_config(*QUICK, "trainer.max_epochs=2", "data.batch_size=4", f"ckpt_path={trained}"))
    assert "data.batch_size: 8 -> 4" in caplog.text
    monkeypatch.setattr(AClip, "__init__", unreachable)
    with pytest.raises(ValueError, match=r"different model[\s\S]*model\.embed_dim: 32 -> 16"):
        train(train_config(*QUICK, "trainer.max_epochs=2", "model.embed_dim=16", f"ckpt_path={trained}"))
    adam = ["model.optimizer._target_=torch.optim.Adam", "~model.optimizer.fused"]
    with pytest.raises(
        ValueError, match=r"optimizer state[\s\S]*_target_: 'torch\.optim\.AdamW' -> 'torch\.optim\.Adam'"
    ):
        train(train_config(*QUICK, "trainer.max_epochs=2", *adam, f"ckpt_path={trained}"))


def test_resuming_a_finished_run_is_an_error_not_a_success(trained, train_config):
    with pytest.raises(TrainingError, match=r"took no optimizer step.*raise them to train further"):
        train(train_config(*QUICK, f"ckpt_path={trained}"))


def test_evaluate_takes_a_run_directory(trained, tmp_path):
    cfg = compose_config("eval", [*SYNTHETIC_EVAL_OVERRIDES, f"ckpt_path={trained}"], tmp_path / "eval")
    assert set(evaluate_checkpoint(cfg)) == {"ema", "online"}


def test_a_broken_evaluation_image_stops_the_run_before_training(train_config, tmp_path, monkeypatch):
    root = tmp_path / "folders"
    for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / label).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), colour).save(root / label / f"{index}.png")
    (root / "blue" / "1.png").write_bytes(b"\x89PNG garbage")
    folder_set = [
        "+evaluation.sets.colours._target_=aclip.evaluation.ZeroShotClassification",
        "+evaluation.sets.colours.dataset._target_=aclip.datamodules.eval_sets.ImageFolderClassification",
        f"+evaluation.sets.colours.dataset.root={root}",
        "+evaluation.sets.colours.templates=['a {} square.']",
    ]
    monkeypatch.setattr(AClip, "__init__", unreachable)
    with pytest.raises(OSError, match=r"1 of the 4 images .* cannot be read[\s\S]*blue/1\.png"):
        train(train_config(*folder_set))


def test_non_utf8_csv_names_the_line_and_the_fix(tmp_path):
    rows = [b"filepath,title\n", *(b"%d.png,caption %d\n" % (i, i) for i in range(600)), b"x.png,caf\xe9\n"]
    path = tmp_path / "train.csv"
    path.write_bytes(b"".join(rows))
    with pytest.raises(ValueError, match=r"line 602 is not valid utf-8.*data\.train\.encoding"):
        CsvCaptions(path)
    assert len(CsvCaptions(path, encoding="latin-1")) == 601


def test_checkpoint_metadata_is_read_without_loading_the_weights_eagerly(trained):
    checkpoint = read_checkpoint(trained / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and "aclip_run_config" in checkpoint


# A run with overrides that the resumes below do not type: a refused key (the tower's depth), a config
# group's option and a value under it. (The data size as an override, where the record holds it; the
# `train_config` fixture would set it in the composed config.)
OWN_RUN = ["model.vision.depth=1", "masking=random", "masking.keep_ratio=0.5", "data.train.size=32"]


@pytest.fixture
def own_run(train_config, tmp_path) -> Path:
    """The run directory of a two-step tiny run with the overrides OWN_RUN."""
    train(train_config(*QUICK, *OWN_RUN, output_dir=tmp_path / "own"))
    return tmp_path / "own"


def test_a_run_resumes_from_its_directory_alone_with_its_own_config(own_run, train_config, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run_training(train_config(f"ckpt_path={own_run}", "trainer.max_epochs=2", output_dir=tmp_path / "on"))
    resumed = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4  # two more steps of the run's two per epoch
    config = resumed[RUN_CONFIG_KEY]
    assert config["model"]["vision"]["depth"] == 1 and config["masking"]["keep_ratio"] == 0.5
    assert config["trainer"]["limit_train_batches"] == 2 and config["trainer"]["max_epochs"] == 2
    assert "differs from the run's" not in caplog.text
    # The resumed run records the overrides it was composed with: resuming it needs nothing retyped either.
    assert {*QUICK, *OWN_RUN, "trainer.max_epochs=2"} <= set(resumed[RUN_OVERRIDES_KEY])


@pytest.mark.parametrize("records_overrides", [True, False])
def test_a_refused_resume_lists_what_differs_without_blaming_overrides_nobody_typed(records_overrides):
    saved, current = {"model": {"vision": {"depth": 1}}}, {"model": {"vision": {"depth": 2}}}
    with pytest.raises(ValueError, match=r"model\.vision\.depth: 1 -> 2") as raised:
        check_resumed_config(saved, current, "run/last.ckpt", records_overrides)
    message = str(raised.value)
    assert "revert" not in message and "give these keys the run's values" in message
    assert ("does not record its run's command line" in message) != records_overrides


def test_a_checkpoints_recorded_overrides_choose_no_code(train_config, tmp_path, caplog):
    planted = [
        "+callbacks.planted._target_=builtins.exec",  # an addition naming code
        "model.optimizer._target_=builtins.eval",  # a value of a _target_
        "data=../eval/synthetic",  # a path out of the config group
        "data.train.size=${oc.create:{_target_:builtins.exec}}",  # an interpolation building a node
    ]
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({RUN_OVERRIDES_KEY: [*OWN_RUN, *planted, "hydra.run.dir=/elsewhere"]}, path)
    with caplog.at_level(logging.WARNING):
        cfg, overrides = compose_resumed(train_config(f"ckpt_path={path}"), str(CONF_DIR))
    assert cfg.model.vision.depth == 1 and cfg.masking.keep_ratio == 0.5  # the run's own values
    assert "planted" not in cfg.callbacks and cfg.model.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.data._target_ == "aclip.datamodules.datamodule.ClipDataModule" and cfg.data.train.size == 32
    assert not any(line in overrides for line in planted) and "hydra.run.dir=/elsewhere" not in overrides
    assert all(line in caplog.text for line in planted)
