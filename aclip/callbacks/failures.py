"""What a run does when it goes wrong: stop on a non-finite loss, save a checkpoint on Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.combined_loader import CombinedLoader
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from aclip.datamodules.sampling import ResumableDataLoader


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the step that produced it did not update the weights."""


def last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The newest checkpoint the trainer's ModelCheckpoint callbacks have written, if any (their last.ckpt
    or the newest file they keep: `callbacks.step_checkpoint` keeps last.ckpt as its one file)."""
    paths = [
        getattr(callback, name, "")
        for callback in trainer.checkpoint_callbacks
        for name in ("last_model_path", "best_model_path")
    ]
    existing = [Path(path) for path in paths if path and Path(path).is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime, default=None)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values (one device sync)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack([check.to(checks[0].device) for check in checks]).all()) if checks else True


class NonFiniteGuard(Callback):
    """Stops training with `NonFiniteLossError` when the loss is NaN or infinite, and never checkpoints
    non-finite weights.

    The loss is checked before the backward pass, so the failing step changes neither the weights, the
    EMA teacher nor the optimizer state, and the last checkpoint stays the last good one. Under DDP the
    ranks agree on the decision, so all of them stop. A checkpoint whose weights are not finite (say, a
    finite loss with non-finite gradients) raises instead of being written.
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss.detach()).all()), all=True)
        if finite:
            return
        value = loss.detach().float().sum().item()
        batch, good = trainer.fit_loop.epoch_loop.batch_idx, last_checkpoint(trainer)
        raise NonFiniteLossError(
            f"the training loss is {value} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {batch}); training stopped before this step "
            "changed the weights. Last good checkpoint: "
            f"{good or 'none written yet'}. Resume from it (ckpt_path=...) after lowering "
            "model.optimizer.lr, setting trainer.gradient_clip_val, or choosing a more stable "
            "trainer.precision."
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not all_finite(list(checkpoint.get("state_dict", {}).values())):
            raise NonFiniteLossError(
                f"the weights hold NaN or infinite values at global step {trainer.global_step}; the "
                f"checkpoint was not written. Last good checkpoint: {last_checkpoint(trainer) or 'none'}."
            )


class InterruptCheckpoint(Callback):
    """Saves `<dirpath>/<filename>.ckpt` when Ctrl-C (KeyboardInterrupt) or a SIGTERM stop ends `fit`.

    Other errors save nothing, so a failed run leaves its last good checkpoint as it was. Resume with
    `ckpt_path=last` (which takes the newer of last.ckpt and this file). A batch interrupted before its
    step finished is read again on resume. Under DDP every rank must see the interrupt (as a Ctrl-C in
    the terminal, or a scheduler's signal to the whole job, does), since saving synchronises them.
    """

    def __init__(self, dirpath: str | Path, filename: str = "interrupted") -> None:
        if not filename:
            raise ValueError("filename must not be empty")
        self.dirpath, self.filename = Path(dirpath), filename

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._rewind_unfinished_batch(trainer)
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as error:  # keep the interrupt's own shutdown going
            rank_zero_warn(f"interrupted, but the checkpoint {self.ckpt_path} could not be saved: {error}")
            return
        rank_zero_info(
            f"Interrupted at global step {trainer.global_step}: saved {self.ckpt_path}. Resume with "
            f"ckpt_path={self.ckpt_path} (or ckpt_path=last hydra.run.dir=<this run's directory>)."
        )

    @staticmethod
    def _rewind_unfinished_batch(trainer: pl.Trainer) -> None:
        """A batch handed out but not trained on will be read again: the data position must say so."""
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        unfinished = progress.ready - progress.processed
        if unfinished <= 0 or trainer.train_dataloader is None:
            return
        for loader in CombinedLoader(trainer.train_dataloader).flattened:
            if isinstance(loader, ResumableDataLoader):
                loader.rewind(unfinished)
