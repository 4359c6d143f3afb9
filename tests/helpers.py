"""Plumbing the tests share: a fresh copy of the repository, as a clone would hold it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_copy(directory: Path, venv: bool = True) -> Path:
    """The repository's files (tracked and untracked, not ignored) in `directory`, with a `.venv` link to
    the environment running the tests (`venv`)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / name)
    if venv:
        (directory / ".venv").symlink_to(sys.prefix)
    return directory
