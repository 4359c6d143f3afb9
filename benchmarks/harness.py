"""What the benchmarks share: the project's own configs, module and Lightning loop, on a fixed batch.

Each variant is composed from `conf/train.yaml` with a method preset (`VARIANTS`) and a model size,
instantiated as the real `AClip` module, and trained by a real `pytorch_lightning.Trainer` with the
`EMAUpdate` callback of the config. The batch is drawn once from the real datamodule (the built-in
dataset through `MultiViewTransform`, so its shapes, boxes and tokens are what training sees), moved to
the device, and fed again at every step: the loop then measures the model alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from aclip.config import validate_config
from aclip.modules.aclip import AClip

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BENCHMARKS_FILE = CONF_DIR.parent / "BENCHMARKS.md"

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
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    validate_config(cfg)
    return cfg


def compose_variant(variant: str, model: str, batch_size: int, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config of `variant` (a key of `VARIANTS`) for `model` (a conf/model name)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    return compose_training(
        [
            f"model={model}",
            f"method={VARIANTS[variant]}",
            f"data.batch_size={batch_size}",
            "data.num_workers=0",
            *overrides,
        ]
    )


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): Hydra overrides of every variant's training config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of every variant's training config, e.g. model.compile=true (repeatable)",
    )


def check_compile_warmup(parser: argparse.ArgumentParser, overrides: Sequence[str], warmup: int) -> None:
    """Reject `model.compile=true` with fewer than 3 untimed steps: the towers compile during warm-up."""
    if any(o.replace(" ", "").lower() == "model.compile=true" for o in overrides) and warmup < 3:
        parser.error("model.compile=true compiles during the first steps: use --warmup 3 or more")


def build_module(cfg: DictConfig, seed: int = 0) -> AClip:
    """The configured LightningModule, with weights drawn from `seed`."""
    pl.seed_everything(seed, workers=False, verbose=False)
    return instantiate(cfg.model)


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# How step times are read: the wall clock (the device synchronised), or the CPU time of this process,
# which on a CPU shared with other jobs counts only the work of this one.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


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
    `clock` is a key of `CLOCKS`.
    """

    def __init__(self, warmup: int, clock: str = "wall") -> None:
        self.warmup = warmup
        self.clock = CLOCKS[clock]
        self.times: list[float] = []
        self.peak_memory: int | None = None
        self._last: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

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
    flops: int | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def build_variant(name: str, model: str, batch_size: int, overrides: Sequence[str] = ()) -> Variant:
    """Compose, instantiate and draw the batch of one variant."""
    cfg = compose_variant(name, model, batch_size, overrides)
    return Variant(name, cfg, build_module(cfg), draw_batch(cfg))


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
    if count:
        variant.flops = counter.flops


def run_interleaved(variants: Sequence[Variant], rounds: int, settings: RunSettings) -> None:
    """`rounds` rounds over all variants, each round in a rotated order, so machine drift cancels."""
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            time_steps(variant, settings)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--output` and `--no-record`: where the report is appended."""
    parser.add_argument(
        "--output",
        type=Path,
        help="markdown file the report is appended to (default: BENCHMARKS.md; none with --quick)",
    )
    parser.add_argument("--no-record", action="store_true", help="print the report without appending it")


def output_file(args: argparse.Namespace) -> Path | None:
    """The file the report goes to: `--output`, else BENCHMARKS.md unless `--quick`; None: print only."""
    if args.no_record:
        return None
    if args.output is not None:
        return args.output
    return None if args.quick else BENCHMARKS_FILE


def publish(text: str, output: Path | None) -> None:
    """Print the report and append it to `output` (when given)."""
    print(text)
    if output is not None:
        with output.open("a") as file:
            file.write("\n" + text)


def code_version() -> str:
    """The checkout's commit, `-dirty` when the working tree has changes (`unknown` outside git)."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=CONF_DIR.parent, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return described.stdout.strip() or "unknown"


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


def device_name(device: torch.device) -> str:
    """A short description of the device: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{_cpu_model()} ({os.cpu_count()} cores), torch using {threads} thread{'s' * (threads > 1)}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda[:i]`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
