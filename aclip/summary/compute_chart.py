"""A sweep's compute chart: the primary metric against training FLOPs and against training seconds.

As FLIP's Figure 1 and CLIPA's compute plots: methods compared at the compute they spent, not at equal
epochs. One point per job, and per group of jobs that differ only in `seed` their mean with standard
deviations as error bars (of the metric, and of the compute), so that `budget.flops` sweeps line their
groups up on one vertical. A job's compute comes from its timing.json: `training_flops` (counted before
training, `aclip.compute`) and its training seconds (`fit_seconds` less `validation_seconds`); the same
figures are columns of summary.csv. Written as `summary_compute.png` by the sweep summary.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aclip.summary.charts import save_figure
from aclip.summary.table import Summary, job_compute, label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COMPUTE_FILE = "summary_compute.png"
AXES = (("training FLOPs", "training FLOPs"), ("train s", "training seconds"))


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compute_chart(summary: Summary) -> Figure | None:
    """The compute chart of the sweep's finished jobs (see the module), each seed group in its colour
    (`Summary.colours`); None when no job counted FLOPs."""
    metric = summary.primary_metric
    done = [job for job in summary.jobs if job.metrics and job_compute(job.timing)["training FLOPs"]]
    if metric is None or not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Any]] = {}
    for job in done:
        groups.setdefault(summary.group_label(job), []).append(job)
    colours = summary.colours
    figure, panels = plt.subplots(1, len(AXES), figsize=(11.0, 4.2), sharey=True)
    model, key = metric.split("/", 1)
    for name, jobs in groups.items():
        colour = colours[name]
        values = [job.metrics.get(model, {}).get(key, math.nan) for job in jobs]
        for axes, (field, _) in zip(panels, AXES, strict=True):
            compute = [job_compute(job.timing)[field] for job in jobs]
            pairs = [(x, y) for x, y in zip(compute, values, strict=True) if x is not None]
            if not pairs:
                continue
            xs, ys = zip(*pairs, strict=True)
            axes.scatter(xs, ys, s=12, color=colour, alpha=0.35, linewidths=0)
            (x, x_error), (y, y_error) = _spread(list(xs)), _spread(list(ys))
            axes.errorbar(
                x,
                y,
                xerr=x_error,
                yerr=y_error,
                fmt="o",
                color=colour,
                capsize=3,
                label=f"{name} (n={len(xs)})",
            )
    for axes, (_, title) in zip(panels, AXES, strict=True):
        # From no compute: the jobs of one budget share a vertical instead of spreading over a zoomed axis.
        axes.set_xlim(0, 1.1 * axes.dataLim.x1)
        axes.set_xlabel(title)
        axes.grid(alpha=0.3)
    panels[0].set_ylabel(label(metric))
    panels[-1].legend(fontsize=7, loc="best")
    figure.suptitle(
        f"{label(metric)} against compute: a point per job, mean ± std per seed group", fontsize=9
    )
    figure.tight_layout()
    return figure


def plot_compute(summary: Summary) -> Path | None:
    """`summary_compute.png` in the sweep directory; None when no job counted FLOPs."""
    figure = compute_chart(summary)
    return None if figure is None else save_figure(figure, summary.sweep_dir / COMPUTE_FILE)
