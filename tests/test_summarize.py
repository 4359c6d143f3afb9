"""Sweep summaries: one table per multirun, seeds aggregated, missing jobs named."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from aclip.summary.charts import bar_chart
from aclip.summary.sweep import summarize
from aclip.summary.table import collect, expected_jobs

TOP1 = "zeroshot/synthetic/top1"


def make_job(
    sweep: Path, number: int, overrides: list[str], top1: float | None, seconds: float = 0.5
) -> None:
    """A job folder as a finished multirun job leaves it (only the files the summary reads)."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"optimized_metric": TOP1}), job / ".hydra" / "config.yaml")
    if top1 is not None:
        metrics = {"ema": {TOP1: top1, "retrieval/synthetic/i2t_R@1": top1 / 2}, "online": {TOP1: top1 - 1}}
        (job / "metrics.json").write_text(json.dumps(metrics))
        (job / "timing.json").write_text(
            json.dumps({"seconds_per_step": seconds, "kept_tokens": 32, "num_views": 2})
        )


def write_multirun_yaml(sweep: Path, task: list[str], params: dict[str, str] | None = None) -> None:
    """The sweep's config as Hydra's basic sweeper saves it (the keys the summary reads)."""
    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params}
    config = {"hydra": {"sweeper": sweeper, "overrides": {"task": task}}}
    OmegaConf.save(OmegaConf.create(config), sweep / "multirun.yaml")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_seeds_are_aggregated_to_mean_and_std(tmp_path):
    values = {("random", 0): 10.0, ("random", 1): 14.0, ("random", 2): 15.0, ("attentive_low", 0): 20.0,
              ("attentive_low", 1): 22.0, ("attentive_low", 2): 30.0}  # fmt: skip
    for number, ((masking, seed), top1) in enumerate(values.items()):
        make_job(tmp_path, number, ["debug=fast_dev_run", f"masking={masking}", f"seed={seed}"], top1)
    summary, paths = summarize(tmp_path)
    assert summary.varying == ["masking", "seed"] and summary.shared == {"debug": "fast_dev_run"}
    rows = read_csv(paths["csv"])
    assert [row["masking"] for row in rows] == ["random"] * 3 + ["attentive_low"] * 3
    assert float(rows[3][f"ema/{TOP1}"]) == 20.0 and float(rows[3][f"online/{TOP1}"]) == 19.0
    groups = {row["masking"]: row for row in read_csv(paths["seeds_csv"])}
    for masking in ("random", "attentive_low"):
        samples = [v for (m, _), v in values.items() if m == masking]
        assert groups[masking]["seeds"] == "3"
        assert float(groups[masking][f"ema/{TOP1} mean"]) == pytest.approx(statistics.fmean(samples))
        assert float(groups[masking][f"ema/{TOP1} std"]) == pytest.approx(statistics.stdev(samples))
    markdown = paths["md"].read_text()
    assert "Mean ± standard deviation over seeds" in markdown and "24.00 ± 5.29" in markdown
    assert paths["png"].stat().st_size > 1000


def test_missing_job_is_listed_and_the_rest_summarised(tmp_path):
    """The jobs the sweep was to run come from multirun.yaml, so a deleted folder is named, not skipped."""
    write_multirun_yaml(tmp_path, ["debug=fast_dev_run", "masking=random,grid,block"])
    assert expected_jobs(tmp_path) == [
        {"debug": "fast_dev_run", "masking": masking} for masking in ("random", "grid", "block")
    ]
    make_job(tmp_path, 0, ["debug=fast_dev_run", "masking=random"], 5.0)
    make_job(tmp_path, 2, ["debug=fast_dev_run", "masking=block"], 7.0)
    make_job(tmp_path, 3, ["debug=fast_dev_run", "masking=none"], None)  # started, never finished
    result = subprocess.run(
        [sys.executable, "-m", "aclip.summary", str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert (
        "job 1 has no result (missing)" in result.stderr
        and "job 3 has no result (no result)" in result.stderr
    )
    rows = read_csv(tmp_path / "summary.csv")
    assert [(row["masking"], row["status"]) for row in rows] == [
        ("random", "ok"),
        ("grid", "missing"),
        ("block", "ok"),
        ("none", "no result"),
    ]
    assert "job 1 (missing): debug=fast_dev_run masking=grid" in (tmp_path / "summary.md").read_text()


def test_sweeper_params_from_a_preset_count_as_jobs(tmp_path):
    """`hparams_search=*` presets put their sweep in hydra.sweeper.params, not on the command line."""
    write_multirun_yaml(tmp_path, ["hparams_search=keep_ratio"], {"masking.keep_ratio": "0.25,0.5"})
    jobs = expected_jobs(tmp_path)
    assert [job["masking.keep_ratio"] for job in jobs] == ["0.25", "0.5"]
    assert collect(tmp_path).missing[0].status == "missing"


def test_sweeps_without_an_enumeration_list_the_gaps(tmp_path):
    """Optuna chooses its trials as it goes: the numbers below the largest job found are expected."""
    make_job(tmp_path, 0, ["model.optimizer.lr=0.001"], 3.0)
    make_job(tmp_path, 2, ["model.optimizer.lr=0.002"], 4.0)
    assert expected_jobs(tmp_path) is None
    assert [job.status for job in collect(tmp_path).jobs] == ["ok", "missing", "ok"]


def write_curve(sweep: Path, number: int, recall: list[float]) -> None:
    """The job's CSV log as Lightning's CSV logger writes it: rows of other metrics in between."""
    path = sweep / str(number) / "csv" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "step", "train/object_recall", "val/zeroshot/synthetic/top1"])
        for index, value in enumerate(recall):
            writer.writerow([0, 10 * index + 9, value, ""])
            writer.writerow([0, 10 * index + 9, "", 5.0])


def test_curves_are_read_per_seed_group_and_drawn(tmp_path):
    from aclip.summary.curves import grouped_curves, read_curve

    curves = {("random", 0): [0.5, 0.5, 0.5], ("random", 1): [0.5, 0.49, 0.51],
              ("attentive_low", 0): [0.4, 0.6, 0.8], ("attentive_low", 1): [0.05, 0.3, 0.7]}  # fmt: skip
    for number, ((masking, seed), recall) in enumerate(curves.items()):
        make_job(tmp_path, number, [f"masking={masking}", f"seed={seed}"], 10.0)
        write_curve(tmp_path, number, recall)
    steps, values = read_curve(tmp_path / "3", "train/object_recall")
    assert steps.tolist() == [9, 19, 29] and values.tolist() == [0.05, 0.3, 0.7]  # blank rows skipped

    summary, paths = summarize(tmp_path, curves=["train/object_recall", "train/not_logged"])
    groups = grouped_curves(summary, "train/object_recall")
    assert sorted(groups) == ["attentive_low", "random"] and len(groups["attentive_low"]) == 2
    assert paths["curves_train_object_recall"].stat().st_size > 0
    assert not (tmp_path / "curves_train_not_logged.png").exists()  # no job logged it: no empty chart


def test_tables_keep_one_model_order_natural_recalls_and_no_repeated_reported(tmp_path):
    """A CLIPA job reports the online model (listed first in its metrics.json), another the EMA model:
    the columns stay ema, online; R@1, R@5, R@10; `reported`, a second name of top-1, is left out."""
    for number, reported in enumerate(("online", "ema")):
        job = tmp_path / str(number)
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"seed={number}"]), job / ".hydra" / "overrides.yaml")
        results = {
            TOP1: 30.0 + number,
            "zeroshot/synthetic/reported": 30.0 + number,
            **{f"retrieval/synthetic/i2t_R@{k}": float(k) for k in (1, 5, 10)},
        }
        models = {reported: results, ("ema" if reported == "online" else "online"): results}
        (job / "metrics.json").write_text(json.dumps(models))
    header = read_csv_header(summarize(tmp_path)[1]["csv"])
    recalls = [f"retrieval/synthetic/i2t_R@{k}" for k in (1, 5, 10)]
    assert header[2:10] == [f"{model}/{key}" for model in ("ema", "online") for key in (*recalls, TOP1)]
    assert not any(name.endswith("/reported") for name in header)


def read_csv_header(path: Path) -> list[str]:
    with path.open() as file:
        return next(csv.reader(file))


def test_charts_show_chance_percent_and_one_colour_per_method(tmp_path):
    """summary.png draws the chance level the jobs recorded and says `%`; a method keeps its colour in
    every chart, also in one where the others logged nothing (only attentive masking has a score mass)."""
    from aclip.summary.curves import curve_chart

    for number, masking in enumerate(("random", "attentive_low", "none")):
        make_job(tmp_path, number, [f"masking={masking}"], 10.0 + number)
        (tmp_path / str(number) / "chance.json").write_text(json.dumps({TOP1: 100 / 24}))
        write_curve(tmp_path, number, [0.5, 0.6])
    path = tmp_path / "1" / "csv" / "metrics.csv"
    path.write_text(path.read_text().replace("train/object_recall", "train/object_score_mass"))

    summary = collect(tmp_path)
    bars = bar_chart(summary).axes[0]
    assert bars.get_ylabel().endswith("(%)")
    assert [line.get_ydata()[0] for line in bars.get_lines()] == [pytest.approx(100 / 24)]
    (attentive,) = curve_chart(summary, "train/object_score_mass").axes[0].get_lines()
    assert attentive.get_color() == summary.colours["attentive_low"]
    recall = curve_chart(summary, "train/object_recall").axes[0].get_lines()
    assert {line.get_label(): line.get_color() for line in recall} == {
        f"{masking} (n=1)": summary.colours[masking] for masking in ("random", "none")
    }
    assert len(set(summary.colours.values())) == 3
