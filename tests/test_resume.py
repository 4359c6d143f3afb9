"""Resuming: a run stopped mid-epoch and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from aclip.callbacks.resume import collect_random_states, restore_random_states
from aclip.checkpointing import resolve_ckpt_path
from aclip.datamodules.sampling import EpochShuffleSampler, ResumableDataLoader
from aclip.tasks import train
from tests.helpers import callback_overrides

# 24 samples in batches of 8: 3 steps per epoch, 6 in two epochs. A step checkpoint every 2 steps
# leaves last.ckpt at step 4, one batch into the second epoch, when the run is killed at step 5.
RUN = [
    "method=aclip",  # attentive masking of 2 views, SimCLR and BYOL: EMA, masks and every loss in play
    "data.train.size=24",
    "evaluation.at_end=false",
    "trainer.max_epochs=2",
    "callbacks.mask_pictures=null",
    "callbacks.step_checkpoint.every_n_train_steps=2",
]


class CrashAt(pl.Callback):
    """Test helper: the run dies after optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class SaveFinalState(pl.Callback):
    """Test helper: writes the final step, weights, optimizer and scheduler states to `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {
            "global_step": trainer.global_step,
            "weights": pl_module.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict()["state"],
            "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr(),
            "train_loader": type(trainer.train_dataloader).__name__,
        }
        torch.save(state, self.path)


def helper(name: str, **kwargs: Any) -> list[str]:
    """Overrides adding the test callback `name` of this file."""
    return callback_overrides(Path(__file__).stem, name, **kwargs)


def final_state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def assert_same_tensors(actual: Any, expected: Any) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_kill_and_resume_matches_uninterrupted_run(train_config, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    full = tmp_path / "full.pt"
    train(train_config(*RUN, *helper("SaveFinalState", path=full), output_dir=tmp_path / "full"))

    run_dir = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(train_config(*RUN, *helper("CrashAt", step=5), output_dir=run_dir))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    resumed = tmp_path / "resumed.pt"
    train(train_config(*RUN, "ckpt_path=last", *helper("SaveFinalState", path=resumed), output_dir=run_dir))

    expected, actual = final_state(full), final_state(resumed)
    assert expected["train_loader"] == "ResumableDataLoader", (
        "ClipDataModule.train_dataloader must build an aclip.datamodules.sampling.ResumableDataLoader "
        "for a mid-epoch resume to read the rest of the epoch in order"
    )
    assert actual["global_step"] == expected["global_step"] == 6
    assert actual["weights"].keys() == expected["weights"].keys()
    assert any(name.startswith("ema_model.") for name in expected["weights"])
    assert_same_tensors(actual["weights"], expected["weights"])
    assert_same_tensors(actual["optimizer"], expected["optimizer"])
    assert actual["lr"] == pytest.approx(expected["lr"])


def test_ckpt_path_last_without_a_checkpoint_fails_before_building(train_config, monkeypatch):
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built although there is nothing to resume from")

    monkeypatch.setattr("aclip.modules.aclip.AClip.__init__", unreachable)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last[\s\S]*hydra\.run\.dir=<run dir>"):
        train(train_config("ckpt_path=last", "evaluation.at_end=false"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(train_config("ckpt_path=/nonexistent/last.ckpt", "evaluation.at_end=false"))


def test_resolve_ckpt_path_picks_the_newest_resumable_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last, interrupted = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "interrupted.ckpt"
    (run / "checkpoints" / "step0000004.ckpt").write_bytes(b"")
    last.write_bytes(b"")
    interrupted.write_bytes(b"")
    os.utime(last, (1, 1))
    assert resolve_ckpt_path(None, run) is None
    assert resolve_ckpt_path("last", run) == interrupted  # the newer one
    assert resolve_ckpt_path(str(run), tmp_path / "new_run") == interrupted
    assert resolve_ckpt_path(str(run / "checkpoints"), tmp_path / "new_run") == interrupted
    assert resolve_ckpt_path(str(last), tmp_path / "new_run") == last
    os.utime(interrupted, (0, 0))
    assert resolve_ckpt_path("last", run) == last
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        resolve_ckpt_path("last", tmp_path / "new_run")
    with pytest.raises(FileNotFoundError, match="without a checkpoint"):
        resolve_ckpt_path(str(tmp_path), tmp_path / "new_run")


def read(loader: DataLoader, batches: int | None = None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch.tolist())
        if batches is not None and len(out) == batches:
            break
    return out


def test_loader_resumes_mid_epoch_in_the_same_order():
    data = list(range(40))
    loader = ResumableDataLoader(data, batch_size=4, drop_last=True, seed=3)
    assert isinstance(loader.sampler, EpochShuffleSampler)
    loader.sampler.set_epoch(2)
    epoch = read(loader)
    assert sorted(index for batch in epoch for index in batch) == data
    assert epoch != read(ResumableDataLoader(data, batch_size=4, seed=4))
    assert read(loader) == epoch  # the order is a function of (seed, epoch)

    read(loader, batches=3)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 3, "batch_size": 4, "num_samples": 40}
    resumed = ResumableDataLoader(data, batch_size=4, drop_last=True, seed=3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert resumed.state_dict() == state  # restored, not yet read
    assert read(resumed) == epoch[3:]
    assert read(resumed) == epoch  # the skip applies once


def test_loader_position_from_another_epoch_or_batch_size_is_ignored():
    data = list(range(40))
    loader = ResumableDataLoader(data, batch_size=4, seed=3)
    loader.sampler.set_epoch(5)
    full_epoch = read(loader)
    # Saved at the end of epoch 4: epoch 5 starts from its beginning.
    loader.load_state_dict({"epoch": 4, "batches": 10, "batch_size": 4, "num_samples": 40})
    assert read(loader) == full_epoch
    # Saved with another batch size: warn and start the epoch over.
    with pytest.warns(UserWarning, match="restarts from its beginning"):
        loader.load_state_dict({"epoch": 5, "batches": 2, "batch_size": 8, "num_samples": 40})
    assert read(loader) == full_epoch
    loader.rewind(100)
    assert loader.state_dict()["batches"] == 0


def test_random_states_round_trip_and_load_without_unpickling(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # a cached Gaussian in NumPy's state
    path = tmp_path / "states.pt"
    torch.save(collect_random_states(), path)
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    restore_random_states(torch.load(path, weights_only=True))
    actual = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.testing.assert_close(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
    assert actual[2:] == expected[2:]


class RecordBatches(pl.Callback):
    """Test helper: appends a line per training batch to `path`: its epoch, index in the epoch, and
    digests of its captions' tokens and of its images."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        digests = [hashlib.sha1(batch[key].numpy().tobytes()).hexdigest()[:12] for key in ("text", "images")]
        with open(self.path, "a") as file:
            file.write(f"{trainer.current_epoch} {batch_idx} {' '.join(digests)}\n")


# 48 samples in batches of 8: 6 batches in the one epoch; max_steps stops it after 2 of them.
CUT_SHORT = [
    "data.train.size=48",
    "evaluation.at_end=false",
    "callbacks.mask_pictures=null",
    "evaluation.every_n_steps=null",
]


@pytest.mark.parametrize(
    "raised",
    [
        ["trainer.max_steps=4"],
        # Lightning resumed this one in epoch 1, skipping the rest of epoch 0.
        pytest.param(["trainer.max_steps=4", "trainer.max_epochs=2"], marks=pytest.mark.slow),
    ],
    ids=["max_steps", "and_max_epochs"],
)
def test_raising_max_steps_continues_the_epoch_it_cut_short(train_config, tmp_path, monkeypatch, raised):
    """The batches (captions and crops) of a run stopped by max_steps and resumed with a higher one are
    those of an uninterrupted run. (The weights differ: the schedules stretch over the new max_steps.)"""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))

    def batches(name: str, *overrides: str) -> list[str]:
        record = tmp_path / f"{name}.txt"
        recorder = helper("RecordBatches", path=record)
        train(train_config(*CUT_SHORT, *overrides, *recorder, output_dir=tmp_path / name))
        return record.read_text().splitlines()

    uninterrupted = batches("uninterrupted", "trainer.max_steps=4")
    cut = batches("cut", "trainer.max_steps=2")
    resumed = batches("resumed", f"ckpt_path={tmp_path / 'cut'}", *raised)
    assert [line.split()[:2] for line in uninterrupted] == [["0", str(batch)] for batch in range(4)]
    assert cut + resumed == uninterrupted
