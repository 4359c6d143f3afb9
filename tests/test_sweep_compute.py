"""The sweep summary's compute: the columns behind the chart, and the chart of the metric against them."""

from __future__ import annotations

import json

import pytest

from aclip.summary.compute_chart import COMPUTE_FILE, compute_chart
from aclip.summary.sweep import summarize
from aclip.summary.table import collect
from tests.test_summarize import make_job, read_csv


def test_the_summary_charts_the_metric_against_training_flops_and_seconds(tmp_path):
    jobs = {("clip", 0): 30.0, ("clip", 1): 32.0, ("random_2x50", 0): 34.0, ("random_2x50", 1): 37.0}
    for number, ((method, seed), top1) in enumerate(jobs.items()):
        make_job(tmp_path, number, [f"method={method}", "budget.flops=1e12", f"seed={seed}"], top1)
        timing = {
            "fit_seconds": 100.0 + number,
            "validation_seconds": 10.0,
            "training_flops": 9.9e11 + number,
        }
        (tmp_path / str(number) / "timing.json").write_text(json.dumps(timing))
    _, paths = summarize(tmp_path, curves=())
    rows = read_csv(paths["csv"])
    assert [float(row["training FLOPs"]) for row in rows] == [9.9e11 + n for n in range(4)]
    assert [float(row["train s"]) for row in rows] == pytest.approx([90.0, 91.0, 92.0, 93.0])
    assert paths["compute_png"] == tmp_path / COMPUTE_FILE and paths["compute_png"].stat().st_size > 10_000


def test_a_sweep_without_counted_flops_has_no_compute_chart(tmp_path):
    make_job(tmp_path, 0, ["method=clip"], 30.0)  # timing.json without training_flops (an older run)
    _, paths = summarize(tmp_path, curves=())
    assert "compute_png" not in paths and not (tmp_path / COMPUTE_FILE).exists()
    assert read_csv(paths["csv"])[0]["training FLOPs"] == ""


def test_each_seed_group_keeps_its_colour_on_the_compute_chart(tmp_path):
    """The laboratory's 16 groups: each group in the colour it has in the sweep's other charts, no two
    alike (Matplotlib's cycle of ten would repeat them)."""
    methods = [f"method{index}" for index in range(12)]
    for number, method in enumerate(methods):
        make_job(tmp_path, number, [f"method={method}", "seed=0"], 30.0 + number)
        timing = {"fit_seconds": 100.0, "validation_seconds": 10.0, "training_flops": 1e12}
        (tmp_path / str(number) / "timing.json").write_text(json.dumps(timing))
    summary = collect(tmp_path)
    flops_panel = compute_chart(summary).axes[0]
    drawn = {
        label: handle.lines[0].get_color()
        for handle, label in zip(*flops_panel.get_legend_handles_labels(), strict=True)
    }
    assert drawn == {f"{method} (n=1)": summary.colours[method] for method in methods}
    assert len(set(map(str, drawn.values()))) == len(methods)
