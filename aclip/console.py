"""What a run prints: its directory, the composed config as a tree, a model summary; known noise filtered."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree
from torch import nn

# The config groups printed first, in this order; the other top-level keys follow.
_FIRST = ("data", "model", "masking", "text_masking", "trainer", "callbacks", "logger", "eval", "paths")


def _console() -> Console:
    return Console(soft_wrap=True)


@rank_zero_only
def print_run_header(cfg: DictConfig, output_dir: Path) -> None:
    """The run directory and the composed config (interpolations resolved), one branch per group."""
    tree = Tree(f"[bold]run directory[/] {output_dir}")
    keys = [key for key in _FIRST if key in cfg] + [key for key in cfg if key not in (*_FIRST, "hydra")]
    for key in keys:
        node = cfg[key]
        if OmegaConf.is_config(node):
            text = OmegaConf.to_yaml(node, resolve=True).rstrip() or "{}"
            tree.add(f"[bold]{key}[/]").add(
                Syntax(text, "yaml", theme="ansi_dark", background_color="default")
            )
        else:
            tree.add(f"[bold]{key}[/]: {node}")
    _console().print(tree)


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
