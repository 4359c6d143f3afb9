"""The EMA teacher: moved towards the online model once per optimizer step."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn


def ema_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine momentum schedule (BYOL): `base` at step 0, rising to `final` at `total_steps`."""
    progress = min(max(step, 0) / max(total_steps, 1), 1.0)
    return final - (final - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """ema <- momentum * ema + (1 - momentum) * online, for all parameters at once; buffers copied."""
    ema_params, online_params = list(ema.parameters()), list(online.parameters())
    if len(ema_params) != len(online_params):
        raise ValueError("the EMA and online models must have the same parameters")
    torch._foreach_lerp_(ema_params, online_params, 1.0 - momentum)
    for ema_buffer, online_buffer in zip(ema.buffers(), online.buffers(), strict=True):
        ema_buffer.copy_(online_buffer)


class EMAUpdate(Callback):
    """Moves each EMA module of `pl_module.ema_pairs()` towards its online module after every optimizer step.

    Under gradient accumulation the update happens once per optimizer step, not per micro-batch.
    The momentum follows `ema_momentum` over the run's optimizer steps and is logged as
    `train/ema_momentum`. It depends only on the global step, so a resumed run continues the schedule.
    """

    def __init__(self, base_momentum: float = 0.996, final_momentum: float = 1.0) -> None:
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(
                f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum}, {final_momentum}"
            )
        self.base_momentum = base_momentum
        self.final_momentum = final_momentum
        self._updated_at_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "ema_model"):
            raise TypeError(
                f"{type(pl_module).__name__} has no `ema_model` for the EMAUpdate callback to move"
            )
        self._updated_at_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self._updated_at_step:  # a micro-batch without an optimizer step
            return
        self._updated_at_step = trainer.global_step
        momentum = ema_momentum(
            trainer.global_step - 1,
            int(trainer.estimated_stepping_batches),
            self.base_momentum,
            self.final_momentum,
        )
        for ema, online in pl_module.ema_pairs():
            ema_update(ema, online, momentum)
        pl_module.log("train/ema_momentum", momentum)
