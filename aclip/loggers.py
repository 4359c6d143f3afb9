"""Weights & Biases logging: run names from the Hydra choices, offline when there are no credentials."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info


def wandb_logger(
    name: str | None = None, group: str | None = None, offline: bool | None = None, **kwargs: Any
) -> WandbLogger:
    """A `WandbLogger` (other arguments are its own) with defaults taken from the Hydra run.

    Args:
        name: the run's name; None gives `<experiment>-<masking>`, with `-<job number>` in a multirun
            (the model choice stands for the experiment when no experiment is chosen).
        group: None gives the experiment, with the sweep's timestamp in a multirun, so that the jobs
            of one sweep are grouped together.
        offline: None logs offline exactly when W&B has no credentials (no WANDB_API_KEY, no
            `wandb login`) or WANDB_MODE=offline; the run then writes `<save_dir>/wandb/offline-run-*`,
            which `wandb sync <that directory>` uploads later.
    """
    default_name, default_group = _run_names()
    if offline is None:
        offline = _offline()
    if offline:
        # Given to wandb.init explicitly: W&B reads WANDB_MODE (which WandbLogger sets) once per process.
        kwargs["mode"] = "offline"
        directory = Path(kwargs.get("save_dir") or os.environ.get("WANDB_DIR") or ".") / "wandb"
        rank_zero_info(
            f"W&B logs offline (WANDB_API_KEY or `wandb login` make it log online); upload the run "
            f"later with `wandb sync {directory}/offline-run-<time>-<id>`"
        )
    return WandbLogger(name=name or default_name, group=group or default_group, offline=offline, **kwargs)


def _offline() -> bool:
    """Whether W&B must run offline: WANDB_MODE says so, or it finds no credentials (checked locally)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun")
    import wandb

    return not wandb.login(prompt=False, verify=False)


def _run_names() -> tuple[str | None, str | None]:
    """Default run name and group from the Hydra choices (None, None outside a Hydra run)."""
    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    choices = hydra.runtime.choices
    experiment = choices.get("experiment") or choices.get("model")
    name = f"{experiment}-{choices.get('masking')}"
    if hydra.mode == RunMode.MULTIRUN:
        return f"{name}-{hydra.job.num}", f"{experiment}-{Path(hydra.sweep.dir).name}"
    return name, experiment
