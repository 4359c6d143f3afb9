"""Config names a newcomer can guess: the evaluation's settings are one node, `--help` lists only real
choices, and every old spelling stops at start-up with a message naming the current one (aclip/renamed.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from aclip.callbacks.resume import RUN_CONFIG_KEY
from aclip.config import validate_config
from aclip.errors import ConfigError
from aclip.renamed import RenamedSweepCheck, check_overrides, translate
from aclip.trained import stored_interpolation
from tests.helpers import REPO


def run_script(script: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python <script> <arguments>` as a user runs it (the message alone: no HYDRA_FULL_ERROR)."""
    environment = {name: value for name, value in os.environ.items() if name != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def test_the_evaluation_settings_are_one_node(train_config):
    cfg = train_config()
    assert not {"eval", "evaluate", "eval_loader"} & set(cfg)
    assert {"sets", "at_end", "every_n_steps", "every_n_epochs", "masked", "loader"} <= set(cfg.evaluation)
    assert set(cfg.evaluation.sets) == {"synthetic", "synthetic_retrieval"}
    chosen = train_config("eval=[imagenet,flickr30k]", "evaluation.sets.imagenet.templates=simple")
    assert set(chosen.evaluation.sets) == {"imagenet", "flickr30k"}
    assert chosen.evaluation.sets.imagenet.templates == "simple"


def test_help_lists_no_internal_node():
    """`--help` lists each group's options: the bases the options extend are not among them."""
    result = run_script("train.py", "--help")
    assert result.returncode == 0, result.stderr
    groups = dict(
        line.split(": ", 1) for line in result.stdout.split("== Config ==")[0].splitlines() if ": " in line
    )
    assert {"data", "model", "experiment", "method", "eval"} <= set(groups)
    options = {group: value.split(", ") for group, value in groups.items()}
    assert not sorted(f"{group}={o}" for group, names in options.items() for o in names if o.startswith("_"))
    assert "paper" in options["experiment"] and "aclip" in options["method"]
    assert "aclip" not in options["experiment"]  # a paper row is a method


OLD_SPELLINGS = [
    ("evaluate=false", "evaluation.at_end=false"),
    ("+evaluate=false", "evaluation.at_end=false"),
    ("eval_loader.batch_size=64", "evaluation.loader.batch_size=64"),
    ("eval.synthetic.dataset.size=48", "evaluation.sets.synthetic.dataset.size=48"),
    ("experiment=aclip", "experiment=paper method=aclip"),
    ("experiment=clip,aclip", "experiment=paper method=clip"),
]


@pytest.mark.parametrize(("old", "new"), OLD_SPELLINGS)
def test_an_old_spelling_on_the_command_line_stops_naming_the_new_one(old, new):
    result = run_script("train.py", old)
    assert result.returncode == 1
    assert new in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_evaluate_py_names_the_new_key_too():
    result = run_script("evaluate.py", "ckpt_path=some.ckpt", "eval_loader.num_workers=0")
    assert result.returncode == 1 and "evaluation.loader.num_workers=0" in result.stderr, result.stderr


def test_current_spellings_pass_the_check():
    check_overrides(
        [
            "eval=[imagenet,flickr30k]",
            "+eval=[coco]",
            "evaluation.at_end=false",
            "evaluation.every_n_steps=10",
            "evaluation.sets.synthetic.dataset.size=48",
            "experiment=paper",
            "method=aclip",
            "-m",
            "--cfg",
            "job",
        ]
    )


def test_an_old_key_set_by_a_config_file_stops_the_validation(train_config):
    """What a config file of the user's (or a `+` override that skipped the command-line check) adds."""
    cfg = train_config()
    OmegaConf.set_struct(cfg, False)
    cfg.eval_loader = {"batch_size": 64}
    with pytest.raises(ConfigError, match=re.escape("is now `evaluation.loader`")):
        validate_config(cfg)


def test_a_sweep_over_an_old_key_stops_before_its_first_job(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    sweep = OmegaConf.create(
        {"hydra": {"sweeper": {"params": {"seed": "0,1", "eval_loader.batch_size": "32,64"}}}}
    )
    with pytest.raises(SystemExit) as stopped:
        RenamedSweepCheck().on_multirun_start(sweep)
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert "hydra.sweeper.params" in message and "evaluation.loader.batch_size=32,64" in message


def test_a_run_recorded_with_old_spellings_resumes_with_the_new_ones():
    recorded = [
        "evaluate=false",
        "eval_loader.num_workers=0",
        "experiment=aclip",
        "eval=[synthetic]",
        "seed=1",
    ]
    assert translate(recorded) == [
        "evaluation.at_end=false",
        "evaluation.loader.num_workers=0",
        "experiment=paper",
        "method=aclip",
        "eval=[synthetic]",
        "seed=1",
    ]


@pytest.mark.parametrize(
    "record",
    [
        {"evaluation": {"loader": {"interpolation": "bilinear"}}},
        {"evaluation": {"every_n_steps": 50}, "eval_loader": {"interpolation": "bilinear"}},  # before #29
    ],
)
def test_the_resize_filter_is_read_from_a_run_record_of_either_layout(record, tmp_path):
    assert stored_interpolation({RUN_CONFIG_KEY: record}, tmp_path / "last.ckpt") == "bilinear"
