"""A sweep's summary, written by the Hydra callback `SweepSummary` (`hydra.callbacks.sweep_summary`, every
launcher) as each job ends and when the sweep ends, and rebuilt from the job folders by

    python -m aclip.summary logs/train/multiruns/<timestamp>

for sweeps whose jobs finished on other machines (SLURM) or that were interrupted: the tables
(`aclip.summary.table`), the chart (`charts`), the training curves (`curves`), the compute chart
(`compute_chart`) and, when the jobs log to W&B, a W&B run (`wandb_run`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from aclip.summary.charts import plot
from aclip.summary.compute_chart import plot_compute
from aclip.summary.curves import plot_curves
from aclip.summary.table import Summary, collect, markdown, write_tables

log = logging.getLogger(__name__)

# Training curves drawn per sweep (aclip.summary.curves), where the jobs logged them.
DEFAULT_CURVES = ("train/clip_loss", "train/object_recall", "train/object_score_mass")


def write(summary: Summary, chart: bool = True, curves: Sequence[str] = ()) -> dict[str, Path]:
    """Write summary.csv (every metric), summary_seeds.csv (if seeds vary), summary.md and (`chart`)
    summary.png, the `curves_<metric>.png` of the `curves` metrics the jobs logged and, where the jobs
    counted their FLOPs, summary_compute.png."""
    paths = write_tables(summary)
    png = plot(summary, summary.sweep_dir / "summary.png") if chart else None
    if png is not None:
        paths["png"] = png
    if chart and curves:
        paths |= {path.stem: path for path in plot_curves(summary, curves)}
    if chart:
        compute = plot_compute(summary)
        if compute is not None:
            paths["compute_png"] = compute
    return paths


def summarize(
    sweep_dir: str | os.PathLike, finished: bool = True, curves: Sequence[str] = DEFAULT_CURVES
) -> tuple[Summary, dict[str, Path]]:
    """Collect a sweep's jobs and write its summary files (the charts once the sweep has finished);
    returns both."""
    summary = collect(sweep_dir, finished)
    return summary, write(summary, chart=finished, curves=curves)


class SweepSummary(Callback):
    """Hydra callback: rebuild the sweep's tables when a job ends (on the machine that ran it, so they
    fill as jobs finish) and everything, the chart too, when the sweep ends (then print the tables, and
    log them to W&B when the jobs log there)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            try:
                summarize(config.hydra.sweep.dir, finished=False)
            except Exception as error:  # a summary must never fail a job that trained
                log.warning("could not update the sweep summary in %s: %s", config.hydra.sweep.dir, error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary, paths = summarize(config.hydra.sweep.dir)
        print(markdown(summary))
        log.info("Sweep summary written to %s", ", ".join(str(p) for p in paths.values()))
        if "wandb" in (config.get("logger") or {}):
            # Imported here: it imports Lightning's W&B logger (and torch), which Hydra would otherwise load
            # at the start of every run, when it makes this callback.
            from aclip.summary.wandb_run import log_sweep_summary

            log_sweep_summary(summary, paths, config)
