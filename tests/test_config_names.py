"""Config names a newcomer can guess: `--help` lists only real choices."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def run_script(script: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python <script> <arguments>` as a user runs it (the message alone: no HYDRA_FULL_ERROR)."""
    environment = {name: value for name, value in os.environ.items() if name != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def test_help_lists_no_internal_node():
    """`--help` lists each group's options: the bases the options extend are not among them."""
    result = run_script("train.py", "--help")
    assert result.returncode == 0, result.stderr
    groups = dict(
        line.split(": ", 1) for line in result.stdout.split("== Config ==")[0].splitlines() if ": " in line
    )
    assert {"data", "model", "experiment", "method", "eval"} <= set(groups)
    options = {group: value.split(", ") for group, value in groups.items()}
    assert not sorted(f"{group}={o}" for group, names in options.items() for o in names if o.startswith("_"))
