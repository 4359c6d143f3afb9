"""A sweep's results as tables: its jobs read from their folders (`collect`), `summary.csv`,
`summary_seeds.csv` and `summary.md` in the sweep directory.

Each job folder holds `.hydra/overrides.yaml` (what it was given), `.hydra/config.yaml`, `metrics.json`
(the evaluation of the reported and the other model) and `timing.json` (seconds per step, tokens per
view). A job whose folder is missing (or holds no result) is listed, not skipped silently.

Columns: the overrides that differ between jobs, then the metrics of the EMA and the online model (in
that order, whichever is reported; a set's `reported` figure, which repeats one of its metrics under a
second name, left out), seconds per optimizer step, the training FLOPs and seconds (charted against the
primary metric by `aclip.summary.compute_chart`) and the patch tokens each view kept. Jobs that differ
only in `seed` are also aggregated to mean, standard deviation and count (`summary_seeds.csv` and a
second table). Each group of jobs keeps one colour in every chart (`Summary.colours`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SEED_KEY = "seed"
# Metric kinds shown in the Markdown table (all metrics go to the CSV): zero-shot top-1, retrieval R@1,
# linear-probe top-1 and the suite averages (and a set's reported figure where it is not its top-1).
_HEADLINE_SUFFIXES = ("/top1", "/i2t_R@1", "/t2i_R@1", "/reported", "/average")


@dataclass
class Job:
    """One job of a sweep: its number, overrides and results (None where it has none)."""

    number: int
    overrides: dict[str, str]
    metrics: dict[str, dict[str, float]] | None = None
    timing: dict[str, Any] | None = None
    chance: dict[str, float] | None = None
    optimized_metric: str | None = None
    status: str = "ok"

    @property
    def reported(self) -> str | None:
        """The reported model's name (listed first in metrics.json)."""
        return next(iter(self.metrics), None) if self.metrics else None


@dataclass
class Summary:
    """A sweep's jobs, which overrides vary between them, and the tables built from them."""

    sweep_dir: Path
    jobs: list[Job]
    varying: list[str] = field(default_factory=list)
    shared: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[Job]:
        return [job for job in self.jobs if job.status != "ok"]

    @property
    def primary_metric(self) -> str | None:
        """`<model>/<metric>` charted in summary.png: the jobs' `optimized_metric` of the reported model,
        else its first zero-shot top-1."""
        done = [job for job in self.jobs if job.metrics]
        if not done:
            return None
        job = done[0]
        keys = job.metrics[job.reported]
        metric = job.optimized_metric if job.optimized_metric in keys else None
        metric = (
            metric
            or next((k for k in sorted(keys) if k.endswith("/top1")), None)
            or next(iter(sorted(keys)), None)
        )
        return f"{job.reported}/{metric}" if metric else None

    def metric_columns(self, headline: bool) -> list[str]:
        """`<model>/<metric>` of every metric any job has, the models in `MODEL_ORDER`, the metrics in
        natural order (R@1, R@5, R@10), without the `reported` figures that repeat another metric."""
        # Imported here, to keep torch out of every run's start: Hydra makes the summary's callback then, and
        # the evaluation package imports torch.
        from aclip.evaluation.report import natural_key, ordered_models

        results = [r for job in self.jobs for r in (job.metrics or {}).values()]
        models = ordered_models(model for job in self.jobs for model in job.metrics or {})
        keys = {key for r in results for key in r}
        aliases = _aliases(results, keys)
        keys -= set(aliases)
        if headline:
            keys = {key for key in keys if key.endswith(_HEADLINE_SUFFIXES)} | {
                metric for metric in aliases.values() if not metric.endswith("/top1")
            }
        if self.primary_metric is not None:  # charted, whatever it repeats
            keys.add(self.primary_metric.split("/", 1)[1])
        return [f"{model}/{key}" for model in models for key in sorted(keys, key=natural_key)]

    def group_label(self, job: Job) -> str:
        """The job's group: its values of the varying overrides other than `seed` ("all" without any)."""
        keys = [key for key in self.varying if key != SEED_KEY]
        return " ".join(job.overrides.get(key, "") for key in keys) or "all"

    @property
    def colours(self) -> dict[str, Any]:
        """One colour per group of jobs (`group_label`), in job order, the same in every chart."""
        labels = list(dict.fromkeys(self.group_label(job) for job in self.jobs))
        import matplotlib

        # Matplotlib's qualitative palettes: ten colours, or twenty (paler in between) for more groups.
        palette = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"].colors
        return {label: palette[index % len(palette)] for index, label in enumerate(labels)}

    def rows(self, headline: bool = False) -> tuple[list[str], list[list[Any]]]:
        """The per-job table: header and rows."""
        metrics = self.metric_columns(headline)
        header = [
            "job",
            *self.varying,
            *metrics,
            "s/step",
            *COMPUTE_COLUMNS,
            "tokens/view",
            "views",
            "status",
        ]
        rows = []
        for job in self.jobs:
            values = [job_metric(job, column) for column in metrics]
            timing = job.timing or {}
            rows.append(
                [
                    job.number,
                    *(job.overrides.get(key, "") for key in self.varying),
                    *values,
                    timing.get("seconds_per_step"),
                    *job_compute(timing).values(),
                    timing.get("kept_tokens"),
                    timing.get("num_views"),
                    job.status,
                ]
            )
        return header, rows

    @property
    def has_seed_groups(self) -> bool:
        return SEED_KEY in self.varying

    def seed_groups(self, headline: bool = False) -> tuple[list[str], list[list[Any]]]:
        """Jobs that differ only in `seed`, aggregated: per value column its mean, std and count."""
        metrics = [*self.metric_columns(headline), "s/step"]
        keys = [key for key in self.varying if key != SEED_KEY]
        groups: dict[tuple[str, ...], list[Job]] = {}
        for job in self.jobs:
            if job.metrics:
                groups.setdefault(tuple(job.overrides.get(key, "") for key in keys), []).append(job)
        header = [*keys, "seeds", *(f"{m} {stat}" for m in metrics for stat in ("mean", "std"))]
        rows = []
        for values, jobs in groups.items():
            cells: list[Any] = [*values, len(jobs)]
            for column in metrics:
                samples = [
                    v
                    for v in (
                        (job.timing or {}).get("seconds_per_step")
                        if column == "s/step"
                        else job_metric(job, column)
                        for job in jobs
                    )
                    if v is not None
                ]
                mean = statistics.fmean(samples) if samples else None
                std = statistics.stdev(samples) if len(samples) > 1 else None
                cells += [mean, std]
            rows.append(cells)
        return header, rows


def _aliases(results: Sequence[dict[str, float]], keys: set[str]) -> dict[str, str]:
    """`<kind>/<set>/reported` -> the metric of the same set it repeats in every result (a set's reported
    figure is one of its metrics: top-1 for most sets), top-1 first where several match."""
    aliases = {}
    for key in sorted(key for key in keys if key.endswith("/reported")):
        prefix = key.removesuffix("reported")
        siblings = sorted(
            (k for k in keys if k.startswith(prefix) and k != key), key=lambda k: k != f"{prefix}top1"
        )
        for sibling in siblings:
            if all(r.get(key) == r.get(sibling) for r in results if key in r or sibling in r):
                aliases[key] = sibling
                break
    return aliases


# What a job spent (`job_compute`): the compute chart's axes (aclip.summary.compute_chart) and columns of
# summary.csv.
COMPUTE_COLUMNS = ("training FLOPs", "train s")


def job_compute(timing: dict[str, Any] | None) -> dict[str, float | None]:
    """A job's training FLOPs (`training_flops`, counted before training: aclip.compute) and training
    seconds (`fit_seconds` less `validation_seconds`) from its timing.json, None where it has none."""
    timing = timing or {}
    fit, validation = timing.get("fit_seconds"), timing.get("validation_seconds") or 0.0
    seconds = None if fit is None else fit - validation
    return dict(zip(COMPUTE_COLUMNS, (timing.get("training_flops"), seconds), strict=True))


def job_metric(job: Job, column: str) -> float | None:
    """The job's value of a `<model>/<metric>` column (None where it has none)."""
    model, key = column.split("/", 1)
    return (job.metrics or {}).get(model, {}).get(key)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _overrides(job_dir: Path) -> dict[str, str]:
    """The job's command-line overrides, `key=value`, from its `.hydra/overrides.yaml`."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    return dict(_split(line) for line in OmegaConf.load(path))


def _split(override: str) -> tuple[str, str]:
    key, _, value = str(override).partition("=")
    return key.lstrip("+~"), value


def expected_jobs(sweep_dir: Path) -> list[dict[str, str]] | None:
    """Every job's overrides as Hydra's basic sweeper enumerates them, from the sweep's multirun.yaml;
    None for sweepers that choose their jobs as they go (e.g. Optuna) or without a multirun.yaml."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config = OmegaConf.load(path)
    sweeper = config.hydra.get("sweeper") or {}
    if "BasicSweeper" not in str(sweeper.get("_target_", "")):
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    arguments = [*params, *config.hydra.overrides.task]
    overrides = OverridesParser.create().parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(overrides, None)
    return [dict(_split(item) for item in job) for batch in batches for job in batch]


def collect(sweep_dir: str | os.PathLike, finished: bool = True) -> Summary:
    """The sweep's jobs, read from its job folders (named by job number), with missing ones listed
    (as "pending" while the sweep still runs, `finished=False`)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    folders = {int(p.name): p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    expected = expected_jobs(sweep_dir)
    if expected is None:
        # Without an enumeration, the numbers below the largest one found are the jobs that ran.
        expected = [{} for _ in range(max(folders, default=-1) + 1)]
    jobs = []
    for number in range(max(len(expected), max(folders, default=-1) + 1)):
        folder = folders.get(number)
        overrides = _overrides(folder) if folder else {}
        overrides = overrides or (expected[number] if number < len(expected) else {})
        job = Job(number, overrides)
        if folder is None:
            job.status = "missing" if finished else "pending"
        else:
            job.metrics = _read_json(folder / "metrics.json")
            job.timing = _read_json(folder / "timing.json")
            job.chance = _read_json(folder / "chance.json")
            config = folder / ".hydra" / "config.yaml"
            if config.is_file():
                job.optimized_metric = OmegaConf.load(config).get("optimized_metric")
            if not job.metrics:
                job.status = "no result" if finished else "pending"
        jobs.append(job)
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    values = {key: {job.overrides.get(key) for job in jobs} for key in keys}
    varying = [key for key in keys if len(values[key]) > 1]
    shared = {key: next(iter(values[key])) for key in keys if len(values[key]) == 1}
    return Summary(sweep_dir, jobs, varying, shared)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def label(column: str) -> str:
    """A short heading for a `<model>/<kind>/<set>/<metric>` column, e.g. `ema 0-shot synthetic top1`."""
    parts = column.split("/")
    if len(parts) != 4:
        return column
    model, kind, name, metric = parts
    kind = {"zeroshot": "0-shot", "retrieval": "", "linear_probe": "probe"}.get(kind, kind)
    return " ".join(part for part in (model, kind, name, metric.replace("_R@", " R@")) if part)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    header = [label(name) for name in header]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _seed_table_cells(
    header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> tuple[list[str], list[list[str]]]:
    """The seed-group table with each `mean`/`std` pair joined as `mean ± std`."""
    first_stat = next(i for i, name in enumerate(header) if name.endswith(" mean"))
    names = [*header[:first_stat], *(name.removesuffix(" mean") for name in header[first_stat::2])]
    cells = []
    for row in rows:
        pairs = zip(row[first_stat::2], row[first_stat + 1 :: 2], strict=True)
        joined = [f"{_cell(m)} ± {_cell(s)}" if s is not None else _cell(m) for m, s in pairs]
        cells.append([_cell(v) for v in row[:first_stat]] + joined)
    return names, cells


def markdown(summary: Summary) -> str:
    """The sweep's tables as Markdown: per job, then (when seeds vary) mean ± std per seed group."""
    parts = [f"# Sweep {summary.sweep_dir}", ""]
    if summary.shared:
        parts += ["Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in summary.shared.items()), ""]
    reported = sorted({job.reported for job in summary.jobs if job.reported})
    if reported:
        parts += [f"Reported model (`model.eval_model`): {', '.join(reported)}", ""]
    parts += [_markdown_table(*summary.rows(headline=True)), ""]
    if summary.has_seed_groups:
        parts += [
            "## Mean ± standard deviation over seeds",
            "",
            _markdown_table(*_seed_table_cells(*summary.seed_groups(headline=True))),
            "",
        ]
    never = [job for job in summary.jobs if "teacher_handover_step" in (job.timing or {})]
    never = [job for job in never if job.timing["teacher_handover_step"] is None]
    if never:
        parts += [
            "## Jobs whose teacher never took over",
            "",
            "Their attentive policy kept random cells for the whole run (the teacher warm-up never ended: "
            "the run was too short, or its CLIP loss never left the plateau), so they trained as random "
            "masking of the same budget.",
            "",
        ]
        parts += [
            f"- job {job.number}: " + " ".join(f"{k}={v}" for k, v in job.overrides.items()) for job in never
        ]
        parts.append("")
    if summary.missing:
        parts += ["## Jobs without a result", ""]
        parts += [
            f"- job {job.number} ({job.status}): " + " ".join(f"{k}={v}" for k, v in job.overrides.items())
            for job in summary.missing
        ]
        parts.append("")
    return "\n".join(parts)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    os.replace(temporary, path)


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_tables(summary: Summary) -> dict[str, Path]:
    """Write summary.csv (every metric), summary_seeds.csv (if seeds vary) and summary.md; their paths by
    kind (`csv`, `seeds_csv`, `md`)."""
    directory = summary.sweep_dir
    paths = {"csv": directory / "summary.csv", "md": directory / "summary.md"}
    _write_csv(paths["csv"], *summary.rows())
    if summary.has_seed_groups:
        paths["seeds_csv"] = directory / "summary_seeds.csv"
        _write_csv(paths["seeds_csv"], *summary.seed_groups())
    _write_text(paths["md"], markdown(summary) + "\n")
    return paths
