"""Plumbing the tests share: the tiny configs and their composition, running `train.py` as a user does,
a fresh copy of the repository as a clone would hold it, and a world of processes joined by a gloo
group. (`conftest.py` holds only the fixtures.)"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig

from aclip.cli import compose

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# The model.optimizer node: A-CLIP's AdamW (README 87, main.py 65, 73-75, 124-125 of its published code),
# with torch's fused kernel (this project's choice).
A_CLIP_OPTIMIZER = {
    "_target_": "torch.optim.AdamW",
    "_partial_": True,
    "lr": 5e-4,
    "weight_decay": 0.5,
    "betas": [0.9, 0.98],
    "eps": 1e-8,
    "fused": True,
}
# A model and data small enough for a CPU test: 32 px images, 16 patches, two-layer towers.
TINY_OVERRIDES = [
    "model.vision.image_size=32",
    "model.text.context_length=16",
    "model.embed_dim=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "evaluation.loader.batch_size=32",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# Small built-in sets, applied while those sets are chosen (an experiment may choose others).
SYNTHETIC_DATA_OVERRIDES = ["data.train.size=32"]
SYNTHETIC_EVAL_OVERRIDES = [
    "evaluation.sets.synthetic.dataset.size=48",
    "evaluation.sets.synthetic_retrieval.dataset.size=12",
]
# The tiny run on the default (built-in) data and evaluation sets.
TINY_SYNTHETIC_OVERRIDES = [*TINY_OVERRIDES, *SYNTHETIC_DATA_OVERRIDES, *SYNTHETIC_EVAL_OVERRIDES]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose `conf/<config_name>.yaml` as Hydra's app would, with this run's directory set."""
    run_directory = [f"hydra.run.dir={output_dir}", f"paths.log_dir={output_dir}/logs"]
    return compose(config_name, [*overrides, *run_directory], output_dir)


def run_train_py(
    *arguments: str, cwd: Path, timeout: int = 300, env: Mapping[str, str] | None = None
) -> None:
    """Run `python train.py <arguments>` as a user would; a failure shows the end of its stderr."""
    command = [sys.executable, str(REPO / "train.py"), *arguments]
    environment = {**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})}
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=timeout, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-4000:]


def override_value(job_dir: Path, key: str) -> str:
    """The value a Hydra job was given for `key` on the command line (its `.hydra/overrides.yaml`)."""
    overrides = (job_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in overrides if line.lstrip("- ").startswith(f"{key}="))


def callback_overrides(module: str, name: str, **kwargs: Any) -> list[str]:
    """Overrides adding the callback class `name` of the test module `module`, imported by Hydra."""
    return [
        f"+callbacks.{name}._target_={module}.{name}",
        *(f"+callbacks.{name}.{key}={value}" for key, value in kwargs.items()),
    ]


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


class DeadlineExceeded(AssertionError):
    """Raised in the main thread when a `deadline` passes: a test of something that must end, ending."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail the enclosed code if it runs longer than `seconds` (a hang becomes a test failure, not a CI
    timeout). Main thread only (SIGALRM)."""

    def expire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
