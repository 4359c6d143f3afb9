"""`python -m aclip.summary <sweep dir>`: rebuild a sweep's summary from its job folders
(`aclip.summary.sweep`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from aclip.summary.sweep import DEFAULT_CURVES, summarize
from aclip.summary.table import markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aclip.summary", description="Rebuild a sweep's summary tables from its job folders."
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="the multirun directory, e.g. logs/train/multiruns/<timestamp>"
    )
    parser.add_argument(
        "--curves",
        nargs="*",
        default=list(DEFAULT_CURVES),
        metavar="METRIC",
        help="logged training metrics drawn over steps per seed group, curves_<metric>.png "
        f"(default: {' '.join(DEFAULT_CURVES)}; none: no curves)",
    )
    args = parser.parse_args(argv)
    summary, paths = summarize(args.sweep_dir, curves=args.curves)
    print(markdown(summary))
    for job in summary.missing:
        print(f"job {job.number} has no result ({job.status})", file=sys.stderr)
    print("written: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
