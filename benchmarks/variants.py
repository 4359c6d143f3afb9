"""The benchmarked variants: the project's own configs, module and data, on a fixed batch.

Each variant is composed from `conf/train.yaml` with a method preset (`VARIANTS`) and a model size and
instantiated as the real `AClip` module. Its batch is drawn once from the real datamodule (the built-in
dataset through `MultiViewTransform`, so its shapes, boxes and tokens are what training sees) and fed
again at every step (`benchmarks.timing`): the loop then measures the model alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from aclip.cli import compose, config_dir
from aclip.config import validate_config
from aclip.modules.aclip import AClip
from aclip.modules.schedule import build_optimizer

# Benchmark name -> the method preset (conf/method) that defines it.
VARIANTS: dict[str, str] = {
    "clip": "clip",
    "random_1x50": "random_1x50",
    "attentive_2x50": "attentive_2x50",
    "aclip": "aclip",
    "aclip_eff": "aclip_eff",
    "resize": "clipa_resize",
}


# --dtype -> Lightning precision.
PRECISIONS: dict[str, str] = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


Batch = dict[str, Any]


def compose_training(overrides: Sequence[str]) -> DictConfig:
    """`conf/train.yaml` composed with `overrides`, as `train.py` would run it, validated."""
    cfg = compose("train", overrides)
    validate_config(cfg)
    return cfg


def method_presets() -> list[str]:
    """Every method preset (conf/method), by name."""
    return sorted(path.stem for path in (Path(config_dir()) / "method").glob("*.yaml"))


def compose_variant(variant: str, model: str, batch_size: int, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config of `variant` (a key of `VARIANTS`, or a method preset by its own name) for
    `model` (a conf/model name)."""
    method = VARIANTS.get(variant, variant)
    if method not in method_presets():
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)} or {method_presets()}")
    return compose_training(
        [
            f"model={model}",
            f"method={method}",
            f"data.batch_size={batch_size}",
            "data.num_workers=0",
            *overrides,
        ]
    )


def build_module(cfg: DictConfig, seed: int = 0) -> AClip:
    """The configured LightningModule, with weights drawn from `seed`."""
    pl.seed_everything(seed, workers=False, verbose=False)
    return instantiate(cfg.model)


def attach_barebones_trainer(module: pl.LightningModule) -> None:
    """A `Trainer(barebones=True)` holding the module's optimizer, attached so that its step methods can be
    called directly, outside Lightning's loop (`self.log` is then a no-op; the logged values are still
    computed)."""
    trainer = pl.Trainer(barebones=True, accelerator="cpu", devices=1, max_steps=1)
    trainer.strategy.optimizers = [build_optimizer(module.hparams.optimizer, module.parameters())]
    module.trainer = trainer


def datamodule(cfg: DictConfig, num_workers: int = 0) -> pl.LightningDataModule:
    """The configured datamodule (built-in dataset by default) with `num_workers` loader processes."""
    return instantiate(cfg.data, num_workers=num_workers)


def draw_batch(cfg: DictConfig, seed: int = 0) -> Batch:
    """One training batch from the configured datamodule, on the CPU."""
    pl.seed_everything(seed, workers=False, verbose=False)
    return next(iter(datamodule(cfg).train_dataloader()))


def to_device(batch: Mapping[str, Any], device: torch.device) -> Batch:
    """The batch with every tensor on `device`."""
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


class RepeatedBatch(Dataset):
    """`length` references to one batch: a data source that costs nothing per step."""

    def __init__(self, batch: Batch, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        return self.batch


def repeated_loader(batch: Batch, length: int) -> DataLoader:
    """A loader yielding `batch` itself `length` times (already collated, in the main process)."""
    return DataLoader(RepeatedBatch(batch, length), batch_size=None)


@dataclass
class Variant:
    """A benchmarked variant: its config, module and (CPU) batch, and the times measured so far.

    `ema` says whether the config's EMA callback trains with it (not for a module without an EMA model).
    """

    name: str
    cfg: DictConfig
    module: pl.LightningModule
    batch: Batch
    ema: bool = True
    times: list[float] = field(default_factory=list)
    peak_memory: int = 0
    static_memory: int = 0  # on CUDA: allocated when a step begins (weights, optimizer state, teacher)
    flops: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def milliseconds(self) -> str:
        """The median ms per step and the range of the times, e.g. `12.3 (11.9-13.0)`."""
        ms = [t * 1e3 for t in self.times]
        return f"{self.median * 1e3:.1f} ({min(ms):.1f}-{max(ms):.1f})"


def build_variant(name: str, model: str, batch_size: int, overrides: Sequence[str] = ()) -> Variant:
    """Compose, instantiate and draw the batch of one variant."""
    cfg = compose_variant(name, model, batch_size, overrides)
    return Variant(name, cfg, build_module(cfg), draw_batch(cfg))
