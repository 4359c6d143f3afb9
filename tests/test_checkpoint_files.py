"""What a run leaves in `checkpoints/`: each state written once, `last.ckpt` a link to the newest epoch's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from aclip.checkpointing import resolve_ckpt_path
from aclip.tasks import train
from tests.helpers import callback_overrides

# 16 samples in batches of 8: 2 optimizer steps per epoch; a step checkpoint every 3 steps.
RUN = [
    "data.train.size=16",
    "evaluation.at_end=false",
    "callbacks.mask_pictures=null",
    "callbacks.step_checkpoint.every_n_train_steps=3",
]


class RecordLast(pl.Callback):
    """Test helper: records at `path` what `<dirpath>/last.ckpt` is once optimizer step `step` is saved
    (at the start of the next batch: checkpoint callbacks run after the others)."""

    def __init__(self, step: int, dirpath: str, path: str) -> None:
        self.step, self.last, self.path = step, Path(dirpath) / "last.ckpt", path

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            state = {"link": self.last.is_symlink(), "step": load(self.last)["global_step"]}
            torch.save(state, self.path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def test_one_file_per_checkpoint_and_last_links_to_it(train_config, tmp_path):
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(train_config(*RUN))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step0000002.ckpt"]
    last = checkpoints / "last.ckpt"
    assert os.readlink(last) == "step0000002.ckpt"  # relative: the run directory may move
    assert resolve_ckpt_path(str(run), tmp_path / "next") == resolve_ckpt_path("last", run) == last

    # Resumed from the link in the same directory for a second epoch: the step checkpoint of step 3
    # replaces the link by a file of its own, leaving step0000002.ckpt as it was, and the epoch's end at
    # step 4 writes its file and links last.ckpt to it.
    record = callback_overrides(
        Path(__file__).stem, "RecordLast", step=3, dirpath=checkpoints, path=tmp_path / "at3.pt"
    )
    train(train_config(*RUN, "trainer.max_epochs=2", "ckpt_path=last", *record))
    assert load(tmp_path / "at3.pt") == {"link": False, "step": 3}
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    assert os.readlink(last) == "step0000004.ckpt" and load(last)["global_step"] == 4
    assert load(checkpoints / "step0000002.ckpt")["global_step"] == 2


def test_the_laptop_scale_keeps_its_newest_two_epochs(train_config, tmp_path):
    """Runs of many short epochs would fill a laptop's disk: the tiny scale keeps the newest two epochs'
    files (a truncated newest one still leaves the one before it), and last.ckpt links the newest."""
    checkpoints = tmp_path / "run" / "checkpoints"
    train(train_config(*RUN, "trainer.max_epochs=3"))
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["last.ckpt", "step0000004.ckpt", "step0000006.ckpt"]
    assert os.readlink(checkpoints / "last.ckpt") == "step0000006.ckpt"
