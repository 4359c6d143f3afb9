"""Failures: an interrupted checkpoint write, a NaN loss, Ctrl-C and missing data each end a run cleanly."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from aclip.callbacks.failures import NonFiniteGuard, NonFiniteLossError
from aclip.checkpointing import AtomicCheckpointIO
from aclip.modules.aclip import AClip
from aclip.tasks import train
from aclip.trained import load_checkpoint
from tests.helpers import callback_overrides

# 32 samples in batches of 8: 4 optimizer steps in the one epoch.
RUN = ["evaluation.at_end=false", "callbacks.mask_pictures=null"]


class StopAt(pl.Callback):
    """Test helper: raises KeyboardInterrupt at optimizer step `step`, during the step or after it."""

    def __init__(self, step: int, during_step: bool = False) -> None:
        self.step, self.during_step = step, during_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.during_step and trainer.global_step == self.step:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.during_step and trainer.global_step == self.step:
            raise KeyboardInterrupt


def helper(name: str, **kwargs: Any) -> list[str]:
    """Overrides adding the test callback `name` of this file."""
    return callback_overrides(Path(__file__).stem, name, **kwargs)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def all_finite(checkpoint: dict[str, Any]) -> bool:
    return all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


def write_partly_then_fail(monkeypatch: pytest.MonkeyPatch, after_calls: int = 0) -> None:
    """Make the `after_calls + 1`-th torch.save write a few bytes and then fail, as a full disk would."""
    real_save, calls = torch.save, []

    def save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(file)
        if len(calls) <= after_calls:
            return real_save(obj, file, *args, **kwargs)
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weight": torch.ones(3)}, path)
    write_partly_then_fail(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "weight": torch.zeros(3)}, path)
    previous = io.load_checkpoint(path, weights_only=True)
    assert previous["global_step"] == 1 and torch.equal(previous["weight"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_interrupted_step_checkpoint_leaves_last_loadable(train_config, tmp_path, monkeypatch):
    """A run whose second step checkpoint fails mid-write: last.ckpt still holds the first, whole."""
    write_partly_then_fail(monkeypatch, after_calls=1)
    with pytest.raises(OSError, match="No space left"):
        train(train_config(*RUN, "callbacks.step_checkpoint.every_n_train_steps=1"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    monkeypatch.undo()
    assert load(checkpoints / "last.ckpt")["global_step"] == 1
    assert load_checkpoint(checkpoints / "last.ckpt").hparams.vision["image_size"] == 32


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(train_config, tmp_path, monkeypatch):
    modules: list[AClip] = []
    real_step = AClip.training_step

    def nan_at_step_3(self: AClip, batch: Any, batch_idx: int) -> dict[str, Any]:
        modules.append(self)
        outputs = real_step(self, batch, batch_idx)
        return {**outputs, "loss": outputs["loss"] * float("nan")} if self.global_step == 3 else outputs

    monkeypatch.setattr(AClip, "training_step", nan_at_step_3)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global step 3 \(epoch 0, batch 3\)"):
        train(train_config(*RUN, "callbacks.step_checkpoint.every_n_train_steps=2"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # no interrupted.ckpt
    last = load(checkpoints / "last.ckpt")
    assert last["global_step"] == 2 and all_finite(last)
    # The failing step changed nothing: the weights in memory are still finite.
    assert modules[-1].global_step == 3
    assert all(torch.isfinite(p).all() for p in modules[-1].parameters())


def test_non_finite_weights_are_never_checkpointed():
    trainer = SimpleNamespace(global_step=5, checkpoint_callbacks=[])
    good = {"state_dict": {"w": torch.ones(2), "steps": torch.tensor(3)}}
    NonFiniteGuard().on_save_checkpoint(trainer, None, good)
    bad = {"state_dict": {"w": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(NonFiniteLossError, match="global step 5; the checkpoint was not written"):
        NonFiniteGuard().on_save_checkpoint(trainer, None, bad)


@pytest.fixture
def keep_sigint_handler():
    """Lightning ignores SIGINT after a KeyboardInterrupt (to shut down in peace); restore it after."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("during_step", [False, True], ids=["after_step", "during_step"])
def test_ctrl_c_saves_a_checkpoint_to_resume_from(train_config, tmp_path, keep_sigint_handler, during_step):
    stop = helper("StopAt", step=2, during_step=during_step)
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on KeyboardInterrupt
        train(train_config(*RUN, *stop))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["interrupted.ckpt"]
    interrupted = load(checkpoints / "interrupted.ckpt")
    assert interrupted["global_step"] == 2 and all_finite(interrupted)
    # Two batches were trained on; one handed out during the interrupted step is read again.
    positions = interrupted["loops"]["fit_loop"]["state_dict"].get("combined_loader")
    assert positions, "ClipDataModule.train_dataloader must build a ResumableDataLoader"
    assert (positions[0]["epoch"], positions[0]["batches"]) == (0, 2)
    assert load_checkpoint(checkpoints / "interrupted.ckpt").hparams.vision["image_size"] == 32
    if during_step:
        return
    train(train_config(*RUN, "ckpt_path=last"))  # this run's directory: resumes from interrupted.ckpt
    assert load(checkpoints / "last.ckpt")["global_step"] == 4


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=csv", "data.train.path=/nonexistent/train.csv"],
        ["data=coco", "data.train.path=/nonexistent/captions.json", "data.train.root=/nonexistent"],
        ["data=yfcc15m", "data.train.path=/nonexistent/yfcc15m.pkl"],
        ["data=webdataset", "data.train.urls='/nonexistent/{00000..00003}.tar'", "data.train.num_samples=64"],
    ],
    ids=["csv", "coco", "yfcc15m", "webdataset"],
)
def test_missing_data_fails_before_the_model_is_built(train_config, monkeypatch, overrides):
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before the data paths were checked")

    monkeypatch.setattr(AClip, "__init__", unreachable)
    with pytest.raises(Exception) as raised:  # Hydra wraps what a target raises in InstantiationException
        train(train_config(*overrides, "evaluation.at_end=false"))
    causes, error = [], raised.value
    while error is not None:
        causes.append(error)
        error = error.__cause__
    assert any(isinstance(e, FileNotFoundError) and "/nonexistent" in str(e) for e in causes), causes
