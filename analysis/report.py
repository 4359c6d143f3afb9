"""The analyses' printed result: the command that produced it, then a markdown table."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence


def command_and_table(
    module: str, argv: Sequence[str], key: str, rows: Mapping[object, Mapping[str, float]], digits: int
) -> str:
    """`python -m <module> <argv>` in backquotes, a blank line, then one table row per entry of `rows`
    (its key in the `key` column, its values right-aligned with `digits` decimals)."""
    columns = list(next(iter(rows.values())))
    return "\n".join(
        [
            f"`{shlex.join(['python', '-m', module, *argv])}`",
            "",
            f"| {key} | " + " | ".join(columns) + " |",
            "| ---: | " + " | ".join("---:" for _ in columns) + " |",
            *(
                f"| {name} | " + " | ".join(f"{row[c]:.{digits}f}" for c in columns) + " |"
                for name, row in rows.items()
            ),
        ]
    )
