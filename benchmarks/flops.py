"""FLOPs of a training step: torch's FLOP counter, taught the CPU attention kernel."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop


def _raw(formula: Any) -> Any:
    """torch's (already shape-wrapped) formula in the form `custom_mapping` takes unwrapped."""

    def count(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    count._get_raw = True
    return count


# torch's FLOP counter knows the CUDA attention kernels but not the CPU one that SDPA picks on a CPU.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _raw(sdpa_flop),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(sdpa_backward_flop),
}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter (matmuls, convolutions, attention; element-wise ops count zero), silent."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


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
