"""Training speed: samples per second per device, model FLOPs utilisation, peak GPU memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ThroughputMonitor
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from aclip.evaluation.suite import split_batch
from aclip.flop_counter import flop_counter


def batch_size(batch: Mapping[str, Tensor] | Sequence[Tensor]) -> int:
    """Image-text pairs in a training batch (the k views of a pair count once), or images in a batch of
    an evaluation set (validation)."""
    if isinstance(batch, Mapping):
        return batch["text"].shape[0]
    return split_batch(batch)[0].shape[0]


class Throughput(ThroughputMonitor):
    """Lightning's `ThroughputMonitor` for aclip's batches, plus the FLOPs it needs and peak GPU memory.

    Logged under `train/` at the logging interval once `window_size` batches have passed:
    `device/samples_per_sec` (pairs per second per device; `samples_per_sec` for all devices),
    `device/flops_per_sec` and, on devices whose peak Lightning knows (e.g. A100, H100),
    `device/mfu`. The FLOPs of a batch are those of the phase in force (`aclip.modules.stages`): counted
    before training on fake tensors where the run did so (`AClip.phase_batch_flops`, `aclip.compute`),
    else over the first training batch of each phase, its forward and backward passes (torch's
    FlopCounterMode; the EMA teacher's pass and the kept token count included, gradient-checkpointing
    recomputation too). On CUDA also `train/device/max_memory_gb`, the peak memory allocated by
    tensors on the device.
    """

    def __init__(self, window_size: int = 50, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_size, window_size=window_size, **kwargs)
        self._counter: FlopCounterMode | None = None
        self._counted: dict[int, int] = {}  # FLOPs of a batch by phase, counted here
        self._phase = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._phase = getattr(pl_module, "phase_index", 0)
        precounted = getattr(pl_module, "phase_batch_flops", None)
        if precounted is not None:
            pl_module.flops_per_batch = precounted[self._phase]
        elif self._phase in self._counted:
            pl_module.flops_per_batch = self._counted[self._phase]
        elif trainer.is_global_zero:
            self._counter = flop_counter()
            self._counter.__enter__()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_counting(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_counting(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            pl_module.log("train/device/max_memory_gb", torch.cuda.max_memory_allocated(device) / 2**30)

    @rank_zero_only
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        # Timed (Lightning then leaves the validation time out of the training throughput) but not logged:
        # the FLOPs counted are those of a training batch.
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop_counting(pl_module)

    def _stop_counting(self, pl_module: pl.LightningModule) -> None:
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        self._counted[self._phase] = pl_module.flops_per_batch = self._counter.get_total_flops()
        self._counter = None
