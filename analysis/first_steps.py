"""The first optimizer steps of a configured run, trained exactly as `train.py` trains it (the same
seeding, config, data, optimizer, schedule of the whole run and EMA), with a probe that records a row
of measurements every `--every` steps and stops the run after `--steps`: what `analysis.plateau` and
`analysis.auxiliary_terms` share."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from aclip.modules.aclip import AClip
from analysis.report import command_and_table


class FirstSteps(pl.Callback):
    """A probe: the hooks of a subclass fill `measured` during an optimizer step; every `every` steps, and
    at the last, `rows[step]` gets `row` of the means since the last row; stops after `steps`."""

    def __init__(self, steps: int, every: int) -> None:
        self.steps, self.every = steps, every
        self.rows: dict[int, dict[str, float]] = {}
        self.measured: dict[str, float] = {}
        self._window: list[dict[str, float]] = []

    def row(self, means: dict[str, float], module: AClip) -> dict[str, float]:
        """A row of the table from the window's `means` (a subclass adds what it measures then)."""
        return means

    def on_train_batch_start(self, *args: Any) -> None:
        self.measured = {}

    def on_train_batch_end(self, trainer: pl.Trainer, module: AClip, *args: Any) -> None:
        self._window.append(self.measured)
        step = trainer.global_step
        if step % self.every == 0 or step >= self.steps:
            window, self._window = self._window, []
            means = {key: sum(row[key] for row in window) / len(window) for key in window[0]}
            self.rows[step] = self.row(means, module)
        if step >= self.steps:
            trainer.should_stop = True


def fit_first_steps(cfg: DictConfig, make_probe: Callable[[], FirstSteps]) -> FirstSteps:
    """Train `cfg`'s run (seeded as `train.py` seeds it) with the probe that `make_probe` makes once the
    model is built, and the EMA callback, without logger, checkpoints or evaluation, until the probe
    stops it; the probe."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = instantiate(cfg.data)
    module = instantiate(cfg.model)
    probe = make_probe()
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[probe, instantiate(cfg.callbacks.ema)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=None,
    )
    trainer.fit(module, datamodule=data)
    return probe


def parse_arguments(doc: str | None, argv: Sequence[str]) -> argparse.Namespace:
    """`--seed`, `--steps`, `--every` and `--set KEY=VALUE` (repeated: the run's overrides)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps to run")
    parser.add_argument("--every", type=int, default=10, help="a row every N steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def print_rows(name: str, argv: Sequence[str], rows: dict[int, dict[str, float]]) -> str:
    """The command and the probe's rows as a Markdown table, printed and returned."""
    text = command_and_table(name, argv, "step", rows, digits=3)
    print(text)
    return text
