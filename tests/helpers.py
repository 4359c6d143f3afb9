"""Plumbing the tests share: a fresh copy of the repository, as a clone would hold it, and a world of
processes joined by a gloo group."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def gloo_world(
    function: Callable[[int], Any], directory: Path, world: int = 2, timeout: int = 120
) -> list[Any]:
    """`function(rank)` in each of `world` spawned CPU processes joined by a gloo process group; what each
    returned (tensors, numbers and containers of them), by rank. `function` must be a module-level
    function (the processes import it); `directory` holds the rendezvous file and the results. An error
    in any process is raised here."""
    rendezvous = f"file://{directory / 'rendezvous'}"  # no TCP port to race for
    arguments = (function, world, rendezvous, str(directory), timeout)
    mp.start_processes(_gloo_rank, args=arguments, nprocs=world, start_method="spawn")
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(world)]


def _gloo_rank(
    rank: int, function: Callable[[int], Any], world: int, rendezvous: str, out: str, timeout: int
):
    dist.init_process_group(
        "gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        torch.save(function(rank), f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
