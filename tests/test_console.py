"""What a run prints: the config tree, the progress bar, and the errors that stop it (a message, no
traceback, where the message says everything)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from aclip.cli import run_training
from aclip.console import print_run_header
from aclip.errors import RunError, report_run_errors
from aclip.tasks import train
from tests.helpers import REPO, TINY_SYNTHETIC_OVERRIDES, callback_overrides


def test_config_tree_prints_each_node_once_at_full_width_and_can_be_switched_off(train_config, capsys):
    long_value = "x" * 150
    cfg = train_config("masking=random", f"+data.note={long_value}")
    print_run_header(cfg, Path("run_dir"))
    tree = capsys.readouterr().out  # not a terminal: a file, as in a SLURM log
    assert f"note: {long_value}" in tree  # not cut at 80 columns
    assert tree.count("_target_: aclip.modules.masking.RandomMasking") == 1
    assert "masking: ${masking}" in tree  # the model's reference to it
    assert tree.count("_target_: aclip.tokenizer.Truncate") == 1

    print_run_header(train_config("print_config=false"), Path("run_dir"))
    assert capsys.readouterr().out.strip() == "run directory run_dir"


class RecordProgressBar(pl.Callback):
    """Test helper: writes to `path` what the progress bar shows after each batch."""

    def __init__(self, path: str) -> None:
        self.path, self.shown = path, []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        bar = trainer.progress_bar_callback
        total = bar.progress.tasks[bar.train_progress_bar_id].total  # the bar's, set as the epoch starts
        self.shown.append((total, bar.get_metrics(trainer, pl_module)["train/lr"]))
        torch.save(self.shown, self.path)


def test_progress_bar_ends_at_max_steps_and_shows_the_learning_rate(train_config, tmp_path):
    """4 batches per epoch, 3 steps: the bar's total (and so its ETA) is 3; the rate reads 2.00e-03, not
    Lightning's 0.002 (or 0.000 below 5e-4)."""
    record = callback_overrides(Path(__file__).stem, "RecordProgressBar", path=tmp_path / "shown.pt")
    overrides = ["trainer.enable_progress_bar=true", "trainer.max_steps=3", "evaluation.at_end=false"]
    train(train_config(*overrides, "callbacks.mask_pictures=null", *record))
    shown = torch.load(tmp_path / "shown.pt")
    assert [total for total, _ in shown] == [3, 3, 3]
    assert all(isinstance(lr, str) and "e-0" in lr for _, lr in shown), shown


def run_train_py(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=300,
    )


@pytest.mark.slow
def test_an_invalid_value_is_reported_without_a_traceback(tmp_path):
    """What the user sees (a new process imports torch: a slow test): Hydra prints a `RunError`'s
    message alone."""
    result = run_train_py(*TINY_SYNTHETIC_OVERRIDES, "model.optimizer.lr=-1", cwd=tmp_path)
    assert result.returncode == 1
    assert "model.optimizer.lr must be > 0 (a number), got -1" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_hydra_names_a_mistyped_key_or_option_and_an_unwritable_run_directory(tmp_path):
    """Composition errors are Hydra's own (nothing of aclip runs before them): the key it cannot
    override, or the options the group has. A run directory under a file is named with its key."""
    typo = run_train_py("modle.x=1", cwd=tmp_path)
    assert typo.returncode == 1 and "Key 'modle' is not in struct" in typo.stderr
    typo = run_train_py("model.optimizer.lrr=1", cwd=tmp_path)
    assert "Could not override 'model.optimizer.lrr'" in typo.stderr
    option = run_train_py("model=tinny", cwd=tmp_path)
    assert "Could not find 'model/tinny'" in option.stderr and "\ttiny\n" in option.stderr

    (tmp_path / "file").write_text("")
    unwritable = run_train_py(f"hydra.run.dir={tmp_path / 'file' / 'run'}", cwd=tmp_path)
    assert unwritable.returncode == 1
    assert f"Cannot write the run directory {tmp_path / 'file' / 'run'} (hydra.run.dir" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr


def test_input_errors_are_messages_and_a_bug_keeps_its_traceback(train_config, monkeypatch):
    """A `RunError` is a Hydra `CompactHydraException`: Hydra prints its message alone, no traceback."""
    task = report_run_errors(run_training)
    with pytest.raises(RunError, match=r"^model.optimizer.lr must be > 0 \(a number\), got -1$"):
        task(train_config("model.optimizer.lr=-1"))
    with pytest.raises(RunError, match=r"ckpt_path=/nonexistent/last.ckpt does not exist"):
        task(train_config("ckpt_path=/nonexistent/last.ckpt"))

    def bug(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr("aclip.tasks.train", bug)
    with pytest.raises(KeyError, match="a bug"):  # not a RunError: Hydra prints its traceback
        task(train_config())


def test_a_full_disk_names_the_run_directory_and_its_keys(train_config, tmp_path, monkeypatch):
    def save(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RunError) as raised:
        report_run_errors(run_training)(train_config("trainer.max_steps=1", "evaluation.at_end=false"))
    message = str(raised.value)
    assert message.startswith(f"No space left on device (writing {tmp_path / 'run' / 'checkpoints'}/step")
    assert f"its directory {tmp_path / 'run'} (hydra.run.dir" in message and "paths.log_dir=<dir>" in message
