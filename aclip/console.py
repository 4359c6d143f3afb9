"""What a run prints: its directory, the composed config as a tree, a model summary, the progress bar;
known noise filtered."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.callbacks.progress import ProgressBar, RichProgressBar
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree
from torch import nn

# The config groups printed first, in this order; the other top-level keys follow.
_FIRST = ("data", "model", "masking", "text_masking", "trainer", "callbacks", "logger", "evaluation", "paths")


# Columns of a console that is not a terminal (a file, e.g. a SLURM log): lines are never cut there.
FILE_WIDTH = 10_000


def _console() -> Console:
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = FILE_WIDTH
    return console


def displayed(node: DictConfig | ListConfig) -> Any:
    """`node` as plain containers, its values resolved, except that a reference to a whole node (the
    model's `masking: ${masking}`) stays a reference: the tree shows every node once."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    written = OmegaConf.to_container(node, resolve=False)  # "${masking}" as written, "???" where missing
    plain = {}
    for key in keys:
        if OmegaConf.is_missing(node, key):
            plain[key] = written[key]
            continue
        value = node[key]
        if OmegaConf.is_config(value) and OmegaConf.is_interpolation(node, key):
            value = written[key]
        elif OmegaConf.is_config(value):
            value = displayed(value)
        plain[key] = value
    return plain if isinstance(node, DictConfig) else list(plain.values())


@rank_zero_only
def print_run_header(cfg: DictConfig, output_dir: Path) -> None:
    """The run directory and, when `print_config` (default true), the composed config, one branch per
    group, interpolations resolved except references to whole nodes (`displayed`)."""
    console = _console()
    if not cfg.get("print_config", True):
        console.print(f"[bold]run directory[/] {output_dir}")
        return
    tree = Tree(f"[bold]run directory[/] {output_dir}")
    keys = [key for key in _FIRST if key in cfg] + [key for key in cfg if key not in (*_FIRST, "hydra")]
    for key in keys:
        node = cfg[key]
        if OmegaConf.is_config(node):
            text = OmegaConf.to_yaml(OmegaConf.create(displayed(node))).rstrip() or "{}"
            tree.add(f"[bold]{key}[/]").add(
                Syntax(text, "yaml", theme="ansi_dark", background_color="default")
            )
        else:
            tree.add(f"[bold]{key}[/]: {node}")
    console.print(tree)


class TrainingProgressBar(RichProgressBar):
    """Lightning's rich progress bar with the learning rate in scientific notation (its `.3f` shows
    `0.000` for any rate below 5e-4) and an epoch total, and so an ETA, that ends at `trainer.max_steps`
    when that comes first."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        return {
            key: f"{value:.2e}" if key.endswith("/lr") and isinstance(value, float) else value
            for key, value in items.items()
        }

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return total
        loop = trainer.fit_loop.epoch_loop
        # Batches of this epoch read before a mid-epoch resume (the bar counts from the epoch's start).
        progress = loop.batch_progress
        done = progress.current.ready if loop.restarting and not progress.is_last_batch else 0
        remaining = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
        return min(total, done + remaining)


def progress_bars(enabled: bool, callbacks: list[Callback]) -> list[Callback]:
    """`[TrainingProgressBar()]` when the trainer shows a progress bar (`enabled`) and `callbacks` bring
    none of their own; otherwise nothing."""
    if not enabled or any(isinstance(callback, ProgressBar) for callback in callbacks):
        return []
    return [TrainingProgressBar()]


def _parameters(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@rank_zero_only
def print_model_summary(parts: dict[str, nn.Module], notes: dict[str, str]) -> None:
    """Parameters (all and trainable) of each named part of the model, and a few facts about the run."""
    table = Table(title="model", title_justify="left")
    for column in ("part", "parameters", "trainable"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for name, module in parts.items():
        total, trainable = _parameters(module)
        table.add_row(name, f"{total:,}", f"{trainable:,}")
    console = _console()
    console.print(table)
    for key, value in notes.items():
        console.print(f"[bold]{key}[/]: {value}")


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Filter, narrowly, messages of the libraries that are harmless here and would bury the real ones."""
    # Lightning's advert for its cloud logger, printed at every Trainer start.
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages("💡 Tip: For seamless cloud logging"))
    # The EMA teacher is in eval mode on purpose (no dropout or drop-path; AClip.train keeps it so).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # Lightning 2.6 with torch >= 2.10 (pytorch_lightning/utilities/_pytree.py): a deprecation inside
    # Lightning's own batch-size inference, nothing this project calls.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
