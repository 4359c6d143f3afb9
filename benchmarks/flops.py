"""FLOPs of a training step, counted on its real batches: torch's FLOP counter, taught the CPU attention
kernel (`aclip.flop_counter`, which training counts with)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from aclip.flop_counter import flop_counter


class StepFlops(Callback):
    """Counts the FLOPs of the first optimizer step of a fit (forward and backward, EMA pass included)."""

    def __init__(self) -> None:
        self.flops: int | None = None
        self._counter: FlopCounterMode | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 0:
            self._counter = flop_counter()
            self._counter.__enter__()

    def on_train_batch_end(self, *args: Any) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
