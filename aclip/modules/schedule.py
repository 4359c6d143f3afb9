"""The optimization recipe: AdamW with decay on matrices only, linear warm-up, then cosine decay, by step."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn


def warmup_cosine_lr(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, start_lr: float, final_lr: float
) -> float:
    """Learning rate at optimizer step `step` (0-based).

    Rises linearly from `start_lr` to `base_lr` over `warmup_steps`, then follows a half cosine from
    `base_lr` down to `final_lr`, reached at `total_steps`; constant at `final_lr` after that.
    """
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def check_recipe(
    lr: float,
    weight_decay: float,
    warmup_epochs: float,
    warmup_start_lr: float,
    min_lr: float,
    warmup_steps: int | None = None,
    prefix: str = "",
) -> None:
    """Raise a ValueError naming the first value of the recipe that cannot work (keys named with
    `prefix`)."""
    if not lr > 0:
        raise ValueError(f"{prefix}lr must be > 0, got {lr}")
    for name, value in (("weight_decay", weight_decay), ("warmup_epochs", warmup_epochs)):
        if value < 0:
            raise ValueError(f"{prefix}{name} must be >= 0, got {value}")
    for name, value in (("warmup_start_lr", warmup_start_lr), ("min_lr", min_lr)):
        if not 0 <= value <= lr:
            raise ValueError(f"{prefix}{name} must be in [0, lr={lr}], got {value}")
    if warmup_steps is not None and (
        isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
    ):
        raise ValueError(f"{prefix}warmup_steps must be null or an integer >= 0, got {warmup_steps!r}")


def configure_adamw_cosine(
    parameters: Iterable[nn.Parameter], hparams: Mapping[str, Any], trainer: pl.Trainer
) -> dict[str, Any]:
    """Lightning's optimizer config of A-CLIP's recipe for the trainable `parameters`.

    AdamW (`lr`, `weight_decay`, `betas`, `eps` of `hparams`) decays matrices only: biases, norm weights
    and the 0-d logit scale (ndim < 2) are not decayed. The learning rate follows `warmup_cosine_lr` per
    optimizer step, warming up from `warmup_start_lr` over `warmup_steps` optimizer steps (when given and
    not None) or `warmup_epochs` of `trainer`'s epochs, then decaying to `min_lr` at the trainer's last
    step.
    """
    decay, no_decay = [], []
    for param in parameters:
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": hparams["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=hparams["lr"],
        betas=hparams["betas"],
        # One fused kernel per parameter group: 675 -> 100 ms per step for 110 M parameters on CPU
        # (BENCHMARKS.md); torch's default (foreach) is the slowest part of the step after the towers.
        fused=True,
        eps=hparams["eps"],
    )
    total_steps = int(trainer.estimated_stepping_batches)
    warmup_steps = hparams.get("warmup_steps")
    if warmup_steps is None:
        warmup_steps = round(hparams["warmup_epochs"] * _steps_per_epoch(trainer))
    schedule = partial(
        warmup_cosine_lr,
        total_steps=total_steps,
        warmup_steps=min(warmup_steps, total_steps),
        base_lr=hparams["lr"],
        start_lr=hparams["warmup_start_lr"],
        final_lr=hparams["min_lr"],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / hparams["lr"])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _steps_per_epoch(trainer: pl.Trainer) -> int:
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "warmup_epochs needs a training set of known length; give the dataloader a length "
            "(e.g. a fixed epoch length for streaming data)"
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
