"""Timing training steps: a real `pytorch_lightning.Trainer` with the config's `EMAUpdate` callback on a
variant's fixed batch, steps timed after a warm-up, variants interleaved in rounds."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

from benchmarks.flops import StepFlops
from benchmarks.variants import Variant, repeated_loader, to_device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# How step times are read: the wall clock (the device synchronised), or the CPU time of this process,
# which on a CPU shared with other jobs counts only the work of this one.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_argument(parser: argparse.ArgumentParser, wall: str = "wall time") -> None:
    """`--clock wall|cpu` (a key of `CLOCKS`, default wall); `wall` says what the wall clock times."""
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help=f"wall: {wall}; cpu: this process's CPU time (CPU work only: steadier on a machine shared "
        "with other jobs)",
    )


@dataclass(frozen=True)
class RunSettings:
    """How variants are run: the device, Lightning precision, steps per fit and the clock."""

    device: torch.device
    precision: str
    steps: int
    warmup: int
    clock: str = "wall"


class StepTimer(Callback):
    """Times optimizer steps after `warmup` of them, and the peak device memory of the fit.

    A step's time runs from the end of the previous batch to the end of this one (the device
    synchronised at both), so it holds everything the loop does per step: fetching, forward, backward,
    the optimizer, the EMA update (place this callback after `EMAUpdate`), logging and bookkeeping.
    `clock` is a key of `CLOCKS`. On CUDA, `static_memory` is the memory allocated when the last step
    began (weights, the optimizer's state, the EMA teacher: what does not grow with the batch).
    """

    def __init__(self, warmup: int, clock: str = "wall") -> None:
        self.warmup = warmup
        self.clock = CLOCKS[clock]
        self.times: list[float] = []
        self.peak_memory: int | None = None
        self.static_memory: int | None = None
        self._last: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            self.static_memory = torch.cuda.memory_allocated(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        now = self.clock()
        if self._last is not None:
            self.times.append(now - self._last)
        if trainer.global_step >= self.warmup:
            self._last = now

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self.peak_memory = torch.cuda.max_memory_allocated(pl_module.device)


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and the warnings a short benchmark fit triggers."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")


def fit(
    module: pl.LightningModule,
    cfg: DictConfig,
    data: DataLoader | pl.LightningDataModule,
    settings: RunSettings,
    callbacks: Sequence[Callback] = (),
    ema_callback: Callback | None = None,
) -> None:
    """Train `module` for `settings.warmup + settings.steps` optimizer steps on `data` as training does.

    The EMA callback is the config's (`ema_callback` if given), and `callbacks` run after it. Lightning
    moves the module to `settings.device` and back to the CPU.
    """
    ema_callback = ema_callback or instantiate(cfg.callbacks.ema)
    device = settings.device
    accelerator = "gpu" if device.type == "cuda" else device.type
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=[device.index or 0] if accelerator == "gpu" else 1,
            precision=settings.precision,
            max_steps=settings.warmup + settings.steps,
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[ema_callback, *callbacks],
        )
        if isinstance(data, pl.LightningDataModule):
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, train_dataloaders=data)
    # Free the optimizer state and gradients now, or every variant would hold its own between turns.
    module.zero_grad(set_to_none=True)
    module.trainer = None
    del trainer
    gc.collect()


def time_steps(variant: Variant, settings: RunSettings) -> None:
    """Run `warmup + steps` optimizer steps of `variant` on its fixed batch; record the timed ones.

    The first warm-up step of the variant's first run also counts its FLOPs.
    """
    timer, counter = StepTimer(settings.warmup, settings.clock), StepFlops()
    count = variant.flops is None
    length = settings.warmup + settings.steps
    loader = repeated_loader(to_device(variant.batch, settings.device), length)
    callbacks = [counter, timer] if count else [timer]
    fit(variant.module, variant.cfg, loader, settings, callbacks, None if variant.ema else Callback())
    variant.times += timer.times
    variant.peak_memory = max(variant.peak_memory, timer.peak_memory or 0)
    variant.static_memory = timer.static_memory or variant.static_memory
    if count:
        variant.flops = counter.flops


def run_interleaved(variants: Sequence[Variant], rounds: int, settings: RunSettings) -> None:
    """`rounds` rounds over all variants, each round in a rotated order, so machine drift cancels."""
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            time_steps(variant, settings)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op CPU threads (None: unchanged); the previous number is restored."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
