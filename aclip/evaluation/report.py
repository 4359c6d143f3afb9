"""Presenting evaluation results: a text table, metrics.json and the metrics' chance levels."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

# The order in which tables list the evaluated models, whichever is reported (metrics.json lists the
# reported one first, `model.eval_model`); other names follow in their own order.
MODEL_ORDER = ("ema", "online")


def ordered_models(models: Iterable[str]) -> list[str]:
    """`models` in the tables' fixed order (`MODEL_ORDER`, then the others as given)."""
    names = list(dict.fromkeys(models))
    rank = {name: MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER) for name in names}
    return sorted(names, key=lambda name: (rank[name], names.index(name)))


def natural_key(key: str) -> list[str | int]:
    """A sort key comparing the numbers inside metric names as numbers: R@1, R@5, R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def format_table(
    metrics: dict[str, dict[str, float]],
    reported: dict[str, str] | None = None,
    chance: dict[str, float] | None = None,
) -> str:
    """A text table: one row per metric, one column per evaluated model (`MODEL_ORDER`), the reported
    model (listed first in `metrics`) marked `*`, and the `chance` level of each metric that has one.

    `reported` (`zeroshot/<set>` -> metric name) says which metric is each set's `reported` figure; those
    rows, which repeat that metric under a second name, are left out and named under the table."""
    reported = reported or {}
    first = next(iter(metrics), None)
    models = ordered_models(metrics)
    aliases = {f"{name}/reported" for name in reported}
    keys = sorted({key for results in metrics.values() for key in results} - aliases, key=natural_key)
    headers = [f"{name}*" if name == first and len(models) > 1 else name for name in models]
    if chance:
        headers.append("chance")
    width = max([len("metric"), *map(len, keys)])
    lines = ["metric".ljust(width) + "".join(f"{name:>10}" for name in headers)]
    lines.append("-" * len(lines[0]))
    for key in keys:
        cells = [metrics[name].get(key) for name in models] + ([chance.get(key)] if chance else [])
        lines.append(
            key.ljust(width) + "".join(f"{'-' if v is None else format(v, '.2f'):>10}" for v in cells)
        )
    if len(models) > 1:
        lines.append("* the reported model (model.eval_model), logged as eval/<metric>")
    if reported:
        notes = ", ".join(f"{name.split('/', 1)[1]} {metric}" for name, metric in reported.items())
        lines.append(f"the paper's figure per set (`<set>/reported` in metrics.json): {notes}")
    return "\n".join(lines)


def flatten_metrics(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """Logger keys `<prefix>/<model>/<metric>` for every model, and `<prefix>/<metric>` for the reported
    one (listed first, `model.eval_model`), which dashboards chart by default."""
    flat = {
        f"{prefix}/{model}/{key}": value
        for model, results in metrics.items()
        for key, value in results.items()
    }
    flat |= {f"{prefix}/{key}": value for key, value in next(iter(metrics.values()), {}).items()}
    return flat


def write_metrics(metrics: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Write `{model name: {metric: value}}` as JSON."""
    return _write_json(metrics, path)


def write_chance_levels(chance: dict[str, float], path: str | Path) -> Path:
    """Write `{metric: the value a model guessing at random gets}` (percent) as JSON."""
    return _write_json(chance, path)


def _write_json(content: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return path
