"""How `train.py` and `evaluate.py` report a run that cannot start or go on because of what it was given
or where it writes: the message alone, without a Python traceback, and exit status 1.

* Errors in what the user gave (`InputError`): an invalid config value (`ConfigError`), a checkpoint that
  is missing (`CheckpointNotFoundError`) or cannot be used (`CheckpointError`), weights that do not fit
  (`InitializationError`).
* A full disk (or quota) while the run writes: the message names the run's directory and its keys.
* A run or sweep directory that cannot be made or written (`RunDirectoryCheck`, a Hydra callback, before
  Hydra makes it): the message names the directory and the key.
* An input error found before Hydra's app runs, e.g. an old spelling on the command line
  (`exit_on_input_error`, `aclip.renamed`).

Every other error keeps its traceback, and `HYDRA_FULL_ERROR=1` shows the traceback of these too.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

T = TypeVar("T")

_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class InputError(Exception):
    """An error in what the user gave, whose message names the problem and the fix: the errors the module
    lists derive from it, where they are raised."""


class ConfigError(InputError, ValueError):
    """A configuration value that cannot work, with what to change."""


class RunError(CompactHydraException):
    """An error whose message says everything: Hydra prints the message alone and exits with status 1."""


def exit_on_input_error(check: Callable[..., None], *args: Any) -> None:
    """`check(*args)`, run where Hydra does not report errors (before its app composes the config, or in
    one of its callbacks): an `InputError` is printed as a run's would be, the message alone, and the
    process exits with status 1 (`HYDRA_FULL_ERROR=1` raises it with its traceback)."""
    try:
        check(*args)
    except InputError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(error, file=sys.stderr)
        raise SystemExit(1) from None


def full_disk_message(error: OSError, cfg: DictConfig) -> str:
    """What to do about a full disk (or quota): the file, the run's directory and the keys that move it."""
    run_dir = HydraConfig.get().runtime.output_dir
    written = f"writing {error.filename}" if error.filename else "writing"
    message = (
        f"{error.strerror} ({written}). This run writes into its directory {run_dir} (hydra.run.dir, by "
        "default under paths.log_dir; a training run's checkpoints: callbacks.model_checkpoint.dirpath): "
        "free space there, or put the runs on another disk with paths.log_dir=<dir>"
    )
    if cfg.get("task_name") == "train":
        message += (
            f". A run stopped while saving keeps its last whole checkpoint: ckpt_path={run_dir} resumes"
        )
    return message


def report_run_errors(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """`task` (a Hydra task function) with the errors the module lists raised as `RunError`."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> T:
        try:
            return task(cfg)
        except Exception as error:
            if isinstance(error, OSError) and error.errno in _FULL_DISK:
                raise RunError(full_disk_message(error, cfg)) from error
            if isinstance(error, InputError):
                raise RunError(str(error)) from error
            raise

    return run


class RunDirectoryCheck(Callback):
    """Hydra callback: before Hydra makes the run's directory (the sweep's, in a multirun), check that it
    can be made and written; if not, print why, naming the directory and its key, and exit with status 1
    (Hydra would fail with a traceback naming neither the key nor the remedy)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def check_writable(directory: str, key: str) -> None:
    """Make `directory` and write a file in it; if that fails, print why and exit with status 1 (Hydra's
    callbacks may only warn about an exception, so this one leaves by SystemExit)."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        print(
            f"Cannot write the run directory {path} ({key}, by default under paths.log_dir): "
            f"{error.strerror}. Give a directory you can write: {key}=<dir> or paths.log_dir=<dir>",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
