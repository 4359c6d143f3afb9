"""Training curves of a sweep: one logged metric over optimizer steps, per job or per seed group.

Each job's CSV logger writes `<job>/csv/metrics.csv` (a `step` column and one column per metric, blank
where a row holds other metrics). `plot_curves` draws a metric for every group of jobs that differ only
in `seed`: the mean over the seeds as a line and their spread (minimum to maximum) as a band, so that a
seed that collapses shows; each group keeps its colour in every chart of the sweep (`Summary.colours`).
`python -m aclip.summary <sweep> --curves train/object_recall` draws them for any sweep; the sweep
summary callback draws its configured `curves` when a sweep ends.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aclip.summary.charts import save_figure
from aclip.summary.table import Summary, label

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_curve(job_dir: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric` in the job's `csv/metrics.csv`; empty arrays where it has none."""
    path = job_dir / "csv" / "metrics.csv"
    steps, values = [], []
    if path.is_file():
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                value = row.get(metric)
                if value not in (None, "") and row.get("step") not in (None, ""):
                    steps.append(int(float(row["step"])))
                    values.append(float(value))
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def grouped_curves(summary: Summary, metric: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The metric's curve of every job that logged it, by group label (`Summary.group_label`)."""
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for job in summary.jobs:
        steps, values = read_curve(summary.sweep_dir / str(job.number), metric)
        if len(steps):
            groups.setdefault(summary.group_label(job), []).append((steps, values))
    return groups


def curve_file(summary: Summary, metric: str) -> Path:
    """Where the chart of `metric` goes: `curves_<metric, / as _>.png` in the sweep directory."""
    return summary.sweep_dir / f"curves_{metric.replace('/', '_')}.png"


def curve_chart(summary: Summary, metric: str) -> Figure | None:
    """The chart of one metric (see the module); None where no job logged it."""
    groups = grouped_curves(summary, metric)
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = summary.colours
    figure, axes = plt.subplots(figsize=(6.4, 3.8))
    for name, runs in groups.items():
        steps = np.unique(np.concatenate([steps for steps, _ in runs]))
        # Each run on the common steps (runs log at the same steps; a shorter one leaves NaN).
        table = np.stack([np.interp(steps, s, v, left=math.nan, right=math.nan) for s, v in runs])
        axes.plot(steps, np.nanmean(table, axis=0), color=colours[name], label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
            axes.fill_between(steps, low, high, color=colours[name], alpha=0.15, linewidth=0)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(label(metric))
    axes.set_title(f"{metric}: mean over seeds, band from lowest to highest seed", fontsize=9)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def plot_curves(summary: Summary, metrics: Sequence[str]) -> list[Path]:
    """One chart per metric that some job logged (see the module); returns the files written."""
    charts = ((metric, curve_chart(summary, metric)) for metric in metrics)
    return [save_figure(figure, curve_file(summary, metric)) for metric, figure in charts if figure]
