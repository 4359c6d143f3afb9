"""A sweep's chart, `summary.png`: the reported model's primary metric per job, or per seed group with
error bars, beside its chance level; and how every chart of the summary is saved (`save_figure`)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from aclip.summary.table import SEED_KEY, Summary, job_metric, label

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def bar_chart(summary: Summary) -> Figure | None:
    """A bar chart of the primary metric (percent) per job, or per seed group with standard-deviation
    error bars, each group in its colour (`Summary.colours`), with the metric's chance level where the
    jobs recorded it (chance.json); None without a result."""
    metric = summary.primary_metric
    if metric is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [job for job in summary.jobs if job.metrics]
    colours = summary.colours
    if summary.has_seed_groups:
        header, rows = summary.seed_groups()
        mean_at = header.index(f"{metric} mean")
        seeds_at = header.index("seeds")  # after the group's overrides
        groups = [" ".join(str(v) for v in row[:seeds_at]) or "all" for row in rows]
        values = [row[mean_at] for row in rows]
        errors = [row[mean_at + 1] or 0.0 for row in rows]
        labels = [f"{group}\n(n={row[seeds_at]})" for group, row in zip(groups, rows, strict=True)]
    else:
        groups = [summary.group_label(job) for job in done]
        labels = [
            group if group != "all" else str(job.number) for group, job in zip(groups, done, strict=True)
        ]
        values = [job_metric(job, metric) for job in done]
        errors = None
    values = [math.nan if v is None else v for v in values]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6))
    bars = axes.bar(
        range(len(values)), values, yerr=errors, capsize=4, color=[colours[group] for group in groups]
    )
    texts = [
        f"{v:.1f}" if e is None else f"{v:.1f}±{e:.1f}"
        for v, e in zip(values, errors or [None] * len(values), strict=True)
    ]
    axes.bar_label(bars, texts, fontsize=7, padding=2)
    key = metric.split("/", 1)[1]
    chance = next((job.chance[key] for job in done if key in (job.chance or {})), None)
    if chance is not None:
        axes.axhline(chance, color="0.4", linestyle="--", linewidth=1)
        axes.annotate(
            f"chance {chance:.1f} %",
            (1.0, chance),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.3",
        )
    axes.set_xticks(
        range(len(values)),
        labels,
        rotation=30 if len(labels) > 4 else 0,
        ha="right" if len(labels) > 4 else "center",
        fontsize=8,
    )
    axes.set_ylabel(f"{label(metric)} (%)")
    axes.set_ylim(bottom=0)
    axes.set_title(
        " ".join(key for key in summary.varying if key != SEED_KEY) or summary.sweep_dir.name, fontsize=9
    )
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write `figure` to `path` as a PNG (replacing it whole) and close it."""
    import matplotlib.pyplot as plt

    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def plot(summary: Summary, path: Path) -> Path | None:
    """`bar_chart` written to `path`; None without a result."""
    figure = bar_chart(summary)
    return None if figure is None else save_figure(figure, path)
