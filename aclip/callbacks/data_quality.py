"""Count the training samples that were skipped as unreadable, and stop a run whose data is mostly broken."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from aclip.datamodules.images import BAD_COUNT, BAD_NAMES, READ_COUNT

log = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too large a share of the training samples could not be read, or an epoch yielded too few batches."""


class BadSampleMonitor(pl.Callback):
    """Logs `data/bad_samples` and `data/bad_fraction`; raises `BadDataError` over `max_fraction`, or when
    an epoch yields fewer than `min_epoch_fraction` of its planned batches.

    Every batch carries how many bad samples were counted in its place and how many samples were read for
    it (see `aclip.datamodules.images.skip_record`); the counts are summed over all ranks, so every rank
    reaches the same decision. The share is judged every step once `min_samples` samples have been read (a
    handful of bad files early in a run says little), and at the end of every epoch regardless; an
    epoch-end stop saves `last.ckpt` first, so the epoch's training is kept. The first `max_logged` bad
    samples of every epoch are named in the log as they are met.

    Args:
        max_fraction: largest tolerated share of bad samples among all samples read (default 1%).
        min_samples: samples to read before the share is judged at every step.
        max_examples: bad sample names to keep for the error message.
        min_epoch_fraction: smallest share of an epoch's planned batches it must yield (a stream of broken
            shards yields none); epochs cut short by `trainer.max_steps` or a stop are not judged.
        max_logged: bad samples named in the log per epoch (then a count).
    """

    def __init__(
        self,
        max_fraction: float = 0.01,
        min_samples: int = 10_000,
        max_examples: int = 10,
        min_epoch_fraction: float = 0.5,
        max_logged: int = 20,
    ) -> None:
        for name, value in (("max_fraction", max_fraction), ("min_epoch_fraction", min_epoch_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.max_fraction, self.min_samples, self.max_examples = max_fraction, min_samples, max_examples
        self.min_epoch_fraction, self.max_logged = min_epoch_fraction, max_logged
        self.read = self.bad = 0
        self.examples: list[str] = []
        self._logged_this_epoch = 0

    @property
    def fraction(self) -> float:
        """Share of bad samples among all samples read so far (over all ranks)."""
        return self.bad / max(self.read, 1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logged_this_epoch = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict) or BAD_COUNT not in batch:
            return
        counts, reads, names = batch.pop(BAD_COUNT), batch.pop(READ_COUNT), batch.pop(BAD_NAMES)
        local = torch.tensor(
            [int(reads.sum()), int(counts.sum())], dtype=torch.float64, device=pl_module.device
        )
        read, bad = (int(value) for value in trainer.strategy.reduce(local, reduce_op="sum").tolist())
        self.read, self.bad = self.read + read, self.bad + bad
        new = [line for joined in names if joined for line in joined.split("\n")]
        self._log_names(new)
        self.examples += new[: self.max_examples - len(self.examples)]
        pl_module.log_dict(
            {"data/bad_samples": float(self.bad), "data/bad_fraction": self.fraction},
            on_step=True,
            on_epoch=False,
            sync_dist=False,
        )
        if self.read >= self.min_samples:
            self.check()

    def _log_names(self, names: list[str]) -> None:
        """Name this rank's bad samples in the log, the first `max_logged` of each epoch."""
        room = self.max_logged - self._logged_this_epoch
        for name in names[: max(room, 0)]:
            log.warning("skipped a bad training sample: %s", name)
        if room > 0 and len(names) > room:
            log.warning(
                "more bad training samples this epoch are not named (callbacks.bad_samples.max_logged)"
            )
        self._logged_this_epoch += len(names)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        try:
            self.check()
            self._check_epoch_length(trainer, batches)
        except BadDataError as error:
            if batches > 0:  # keep what this epoch trained, before the error ends the run
                saved = _save_last(trainer)
                if saved is not None:
                    raise BadDataError(f"{error}\nSaved {saved} before stopping.") from None
            raise

    def _check_epoch_length(self, trainer: pl.Trainer, batches: int) -> None:
        """Raise when this epoch yielded far fewer batches than planned (on any rank)."""
        planned = trainer.num_training_batches
        cut_short = trainer.should_stop or (0 < trainer.max_steps <= trainer.global_step)
        if cut_short or trainer.fast_dev_run or not 0 < planned < float("inf"):
            return
        short = trainer.strategy.reduce_boolean_decision(
            batches < self.min_epoch_fraction * planned, all=False
        )
        if short:
            raise BadDataError(
                f"epoch {trainer.current_epoch} yielded {batches} of its {int(planned)} planned batches "
                f"(fewer than callbacks.bad_samples.min_epoch_fraction={self.min_epoch_fraction}); "
                f"{self.bad} bad samples counted so far. The data ran out: check the shards and paths "
                "(data.train.*); with uneven webdataset shards set data.train.resampled=true"
            )

    def check(self) -> None:
        """Raise `BadDataError` when the bad share exceeds `max_fraction`, naming example files."""
        if self.fraction <= self.max_fraction:
            return
        examples = "\n  ".join(self.examples) or "(none recorded on this rank)"
        raise BadDataError(
            f"{self.bad} of {self.read} training samples ({100 * self.fraction:.2f}%) could not "
            f"be read, more than the limit of {100 * self.max_fraction:.2f}% "
            f"(callbacks.bad_samples.max_fraction). Examples:\n  {examples}\n"
            "Fix or remove these files (or the data paths), or raise the limit if the share is expected."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"read": self.read, "bad": self.bad, "examples": list(self.examples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bad = state_dict["bad"]
        # Checkpoints written before the read count was kept hold the good samples instead.
        self.read = state_dict["read"] if "read" in state_dict else state_dict["good"] + self.bad
        self.examples = list(state_dict["examples"])


def _save_last(trainer: pl.Trainer) -> Path | None:
    """Write `last.ckpt` where the run's ModelCheckpoint keeps it (every rank takes part)."""
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "save_last", False) and getattr(callback, "dirpath", None):
            path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            return path
    return None
