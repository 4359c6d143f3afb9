"""Presenting evaluation results: a text table and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path


def format_table(metrics: dict[str, dict[str, float]], reported: dict[str, str] | None = None) -> str:
    """A text table: one row per metric, one column per evaluated model (e.g. online, ema). `reported`
    (`zeroshot/<set>` -> metric name) names, under the table, what each set's `reported` row is."""
    models = list(metrics)
    keys = sorted({key for results in metrics.values() for key in results})
    width = max([len("metric"), *map(len, keys)])
    lines = ["metric".ljust(width) + "".join(f"{name:>10}" for name in models)]
    lines.append("-" * len(lines[0]))
    for key in keys:
        cells = "".join(
            f"{metrics[name][key]:>10.2f}" if key in metrics[name] else f"{'-':>10}" for name in models
        )
        lines.append(key.ljust(width) + cells)
    if reported:
        notes = ", ".join(f"{name.split('/', 1)[1]}: {metric}" for name, metric in reported.items())
        lines.append(f"reported = the paper's figure per set ({notes})")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path
