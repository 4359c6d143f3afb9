"""Count the training samples that were skipped as unreadable, and stop a run whose data is mostly broken."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from aclip.datamodules.datamodule import BAD_COUNT, BAD_NAMES


class BadDataError(RuntimeError):
    """Too large a share of the training samples could not be read."""


class BadSampleMonitor(pl.Callback):
    """Logs `data/bad_samples` and `data/bad_fraction`; raises `BadDataError` over `max_fraction`.

    Every batch carries how many bad samples its dataloader skipped (see
    `aclip.datamodules.datamodule.skip_record`); the counts are summed over all ranks, so every rank
    reaches the same decision. The share is judged every step once `min_samples` samples have been read
    (a handful of bad files early in a run says little), and at the end of every epoch regardless.

    Args:
        max_fraction: largest tolerated share of bad samples among all samples read (default 1%).
        min_samples: samples to read before the share is judged at every step.
        max_examples: bad sample names to keep for the error message.
    """

    def __init__(self, max_fraction: float = 0.01, min_samples: int = 10_000, max_examples: int = 10) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction, self.min_samples, self.max_examples = max_fraction, min_samples, max_examples
        self.good = self.bad = 0
        self.examples: list[str] = []

    @property
    def fraction(self) -> float:
        """Share of bad samples among all samples read so far (over all ranks)."""
        return self.bad / max(self.good + self.bad, 1)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict) or BAD_COUNT not in batch:
            return
        counts = batch.pop(BAD_COUNT)
        names = batch.pop(BAD_NAMES)
        local = torch.tensor([len(counts), int(counts.sum())], dtype=torch.float64, device=pl_module.device)
        good, bad = (int(value) for value in trainer.strategy.reduce(local, reduce_op="sum").tolist())
        self.good, self.bad = self.good + good, self.bad + bad
        room = self.max_examples - len(self.examples)
        self.examples += [line for joined in names if joined for line in joined.split("\n")][:room]
        pl_module.log_dict(
            {"data/bad_samples": float(self.bad), "data/bad_fraction": self.fraction},
            on_step=True,
            on_epoch=False,
            sync_dist=False,
        )
        if self.good + self.bad >= self.min_samples:
            self.check()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check()

    def check(self) -> None:
        """Raise `BadDataError` when the bad share exceeds `max_fraction`, naming example files."""
        if self.fraction <= self.max_fraction:
            return
        examples = "\n  ".join(self.examples) or "(none recorded on this rank)"
        raise BadDataError(
            f"{self.bad} of {self.good + self.bad} training samples ({100 * self.fraction:.2f}%) could not "
            f"be read, more than the limit of {100 * self.max_fraction:.2f}% "
            f"(callbacks.bad_samples.max_fraction). Examples:\n  {examples}\n"
            "Fix or remove these files (or the data paths), or raise the limit if the share is expected."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": self.bad, "examples": list(self.examples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.good, self.bad = state_dict["good"], state_dict["bad"]
        self.examples = list(state_dict["examples"])
