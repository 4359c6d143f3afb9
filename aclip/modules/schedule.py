"""The optimization recipe, as two config nodes of the module: `optimizer`, a torch optimizer made over
the trainable parameters (matrices decayed, biases, norms and the logit scale not), and `scheduler`, the
learning rate per optimizer step (A-CLIP's: linear warm-up, then cosine decay).

Both nodes name their class with `_target_`, as Hydra configs do, and are built here from a registry
(`aclip.specs`): a checkpoint's hyper-parameters hold them, and a checkpoint never chooses the code that
runs. The optimizer node is `_partial_` (Hydra's word for "called later with the rest"): it gets the
parameter groups when training starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from aclip.specs import SpecError, build, class_path, is_integer, is_number

# torch's own optimizers, by the name a config writes (`torch.optim.AdamW`).
OPTIMIZERS: dict[str, type[Optimizer]] = {
    f"torch.optim.{name}": cls
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, Optimizer) and cls is not Optimizer
}
# Class path -> schedule class, for every subclass of LearningRateSchedule defined in this process.
SCHEDULES: dict[str, type[LearningRateSchedule]] = {}


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


class LearningRateSchedule:
    """The learning rate per optimizer step, from the optimizer's own `lr`.

    A subclass defines `lr_curve` (and `check_lr` where its values are bounded by the optimizer's lr).
    Every subclass is registered by its class path (`SCHEDULES`), the classes that `build_schedule`
    makes from a description such as a checkpoint's hyper-parameters.
    """

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        SCHEDULES[class_path(cls)] = cls

    def lr_curve(self, base_lr: float, trainer: pl.Trainer) -> Callable[[int], float]:
        """The learning rate per optimizer step of `trainer`'s run, for an optimizer at `base_lr`."""
        raise NotImplementedError

    def check_lr(self, lr: float, prefix: str = "") -> None:
        """Raise a ValueError if this schedule cannot work with an optimizer at `lr` (keys named with
        `prefix`)."""

    def scheduler(self, optimizer: Optimizer, trainer: pl.Trainer) -> LambdaLR:
        """A per-step scheduler of `optimizer` (each group from its own `lr`) following this schedule."""
        factors = []
        for group in optimizer.param_groups:
            curve, base_lr = self.lr_curve(group["lr"], trainer), group["lr"]
            factors.append(lambda step, curve=curve, base_lr=base_lr: curve(step) / base_lr)
        return LambdaLR(optimizer, factors)


class WarmupCosine(LearningRateSchedule):
    """A-CLIP's schedule: from `warmup_start_lr` linearly to the optimizer's lr over `warmup_steps`
    optimizer steps (or, when that is None, `warmup_epochs` of the trainer's epochs, fractions allowed),
    then a half cosine down to `min_lr` at the trainer's last step."""

    def __init__(
        self,
        warmup_epochs: float = 1.0,
        warmup_steps: int | None = None,
        warmup_start_lr: float = 1e-6,
        min_lr: float = 1e-5,
    ) -> None:
        for name, value in (
            ("warmup_epochs", warmup_epochs),
            ("warmup_start_lr", warmup_start_lr),
            ("min_lr", min_lr),
        ):
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be >= 0 (a number), got {value!r}")
        if warmup_steps is not None and (not is_integer(warmup_steps) or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be null or an integer >= 0, got {warmup_steps!r}")
        self.warmup_epochs, self.warmup_steps = warmup_epochs, warmup_steps
        self.warmup_start_lr, self.min_lr = warmup_start_lr, min_lr

    def check_lr(self, lr: float, prefix: str = "") -> None:
        for name in ("warmup_start_lr", "min_lr"):
            value = getattr(self, name)
            if value > lr:
                raise ValueError(f"{prefix}{name} must be in [0, lr={lr}], got {value}")

    def run_steps(self, trainer: pl.Trainer) -> tuple[int, int]:
        """The optimizer steps of `trainer`'s run and of its warm-up."""
        total_steps = int(trainer.estimated_stepping_batches)
        warmup_steps = self.warmup_steps
        if warmup_steps is None:
            warmup_steps = round(self.warmup_epochs * _steps_per_epoch(trainer))
        return total_steps, warmup_steps

    def scheduler(self, optimizer: Optimizer, trainer: pl.Trainer) -> LambdaLR:
        total_steps, warmup_steps = self.run_steps(trainer)
        if warmup_steps >= total_steps:
            given = (
                f"model.scheduler.warmup_steps={self.warmup_steps}"
                if self.warmup_steps is not None
                else f"model.scheduler.warmup_epochs={self.warmup_epochs} of {_steps_per_epoch(trainer)} "
                "steps each"
            )
            rank_zero_warn(
                f"the learning-rate warm-up covers the whole run ({warmup_steps} steps, {given}, in a run "
                f"of {total_steps} optimizer steps): the learning rate never reaches "
                "model.optimizer.lr. Shorten the warm-up (model.scheduler.warmup_epochs or "
                "model.scheduler.warmup_steps) or train longer (trainer.max_epochs, trainer.max_steps)"
            )
        return super().scheduler(optimizer, trainer)

    def lr_curve(self, base_lr: float, trainer: pl.Trainer) -> Callable[[int], float]:
        total_steps, warmup_steps = self.run_steps(trainer)
        return partial(
            warmup_cosine_lr,
            total_steps=total_steps,
            warmup_steps=min(warmup_steps, total_steps),
            base_lr=base_lr,
            start_lr=self.warmup_start_lr,
            final_lr=self.min_lr,
        )


def build_schedule(spec: Mapping[str, Any], key: str = "scheduler") -> LearningRateSchedule:
    """The schedule a `scheduler` node describes, from `SCHEDULES` only."""
    return build(spec, SCHEDULES, key)


def build_optimizer(
    spec: Mapping[str, Any], parameters: Iterable[nn.Parameter], key: str = "optimizer"
) -> Optimizer:
    """The optimizer an `optimizer` node (`_partial_`, from `OPTIMIZERS` only) describes, over the
    trainable `parameters`: matrices get the node's weight decay; biases, norm weights and the 0-d logit
    scale (ndim < 2) get none."""
    if not isinstance(spec, Mapping) or spec.get("_partial_") is not True:
        raise SpecError(
            f"{key} needs `_partial_: true`: it is called with the parameters when training starts"
        )
    decay, no_decay = [], []
    for param in parameters:
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return build(spec, OPTIMIZERS, key)([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])


def check_recipe(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any], prefix: str = "") -> None:
    """Raise a ValueError naming the first value of the `optimizer` and `scheduler` nodes that cannot work
    (keys named `<prefix>optimizer.<name>`, `<prefix>scheduler.<name>`), before any training.

    The optimizer is made over one dummy parameter, so that torch checks the rest of its arguments."""
    lr, weight_decay = optimizer.get("lr", 1), optimizer.get("weight_decay", 0)
    if not is_number(lr) or lr <= 0:
        raise ValueError(f"{prefix}optimizer.lr must be > 0 (a number), got {lr!r}")
    if not is_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"{prefix}optimizer.weight_decay must be >= 0 (a number), got {weight_decay!r}")
    try:
        made = build_optimizer(optimizer, [nn.Parameter(torch.zeros(2, 2))], key=f"{prefix}optimizer")
    except SpecError:
        raise
    except (TypeError, ValueError) as error:  # torch's own checks of its arguments
        raise ValueError(f"{prefix}optimizer: {error}") from None
    try:
        schedule = build_schedule(scheduler, key=f"{prefix}scheduler")
    except SpecError:
        raise
    except TypeError as error:
        raise ValueError(f"{prefix}scheduler: {error}") from None
    except ValueError as error:  # the constructor's, which names the argument
        raise ValueError(f"{prefix}scheduler.{error}") from None
    schedule.check_lr(made.defaults["lr"], prefix=f"{prefix}scheduler.")


def configure_optimization(
    parameters: Iterable[nn.Parameter],
    optimizer: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    trainer: pl.Trainer,
) -> dict[str, Any]:
    """Lightning's optimizer config: the `optimizer` node over `parameters`, stepped per optimizer step by
    the `scheduler` node's schedule over `trainer`'s run."""
    made = build_optimizer(optimizer, parameters)
    schedule = build_schedule(scheduler).scheduler(made, trainer)
    return {"optimizer": made, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _steps_per_epoch(trainer: pl.Trainer) -> int:
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "warmup_epochs needs a training set of known length; give the dataloader a length "
            "(e.g. a fixed epoch length for streaming data)"
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
