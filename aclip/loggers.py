"""Weights & Biases logging: run names from the Hydra choices, offline when there are no credentials, the
same run continued on resume (a sweep's summary run: `aclip.summary.wandb_run`).
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from aclip.checkpointing import resolve_ckpt_path, run_dir_of

# The W&B run id of a run, in its run directory: a run resumed from its checkpoint continues that W&B run.
RUN_ID_FILE = "wandb_run_id.txt"


def wandb_logger(
    name: str | None = None,
    group: str | None = None,
    offline: bool | None = None,
    resume_from: str | None = None,
    job_type: str | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A `WandbLogger` (other arguments are its own) with defaults taken from the Hydra run.

    Args:
        name: the run's name; None gives `<experiment>-<method>-<masking>` (the method left out when
            none is chosen), with `-<job number>` in a multirun (the
            model choice stands for the experiment when no experiment is chosen).
        group: None gives the experiment, with the sweep's timestamp in a multirun, so that the jobs
            of one sweep are grouped together.
        offline: None logs offline exactly when W&B has no credentials (no WANDB_API_KEY, no
            `wandb login`) or WANDB_MODE=offline; the run then writes `<save_dir>/wandb/offline-run-*`,
            which `wandb sync <that directory>` uploads later.
        resume_from: the run's `ckpt_path`: a training job (`job_type="train"`) resumed from the
            checkpoint of a run that logged to W&B continues that W&B run (its id is kept in the run
            directory, `wandb_run_id.txt`). Other jobs (evaluate.py) start runs of their own.
        job_type: W&B's job type, the Hydra task (`train`, `eval`).
    """
    default_name, default_group = _run_names()
    if offline is None:
        offline = offline_by_default()
    save_dir = Path(kwargs.get("save_dir") or ".")
    if offline:
        # Given to wandb.init explicitly: W&B reads WANDB_MODE (which WandbLogger sets) once per process.
        kwargs["mode"] = "offline"
        directory = Path(kwargs.get("save_dir") or os.environ.get("WANDB_DIR") or ".") / "wandb"
        rank_zero_info(
            f"W&B logs offline (WANDB_API_KEY or `wandb login` make it log online); upload the run "
            f"later with `wandb sync {directory}/offline-run-<time>-<id>`"
        )
    resumed = previous_run_id(resume_from, save_dir) if job_type == "train" else None
    run_id = kwargs.pop("id", None) or resumed or _new_run_id()
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / RUN_ID_FILE).write_text(run_id + "\n")
    return WandbLogger(
        name=name or default_name,
        group=group or default_group,
        offline=offline,
        id=run_id,
        resume="allow",
        job_type=job_type,
        **kwargs,
    )


def previous_run_id(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The W&B run id kept beside the checkpoint that `ckpt_path` resumes from, if there is one."""
    if not ckpt_path:
        return None
    try:
        checkpoint = resolve_ckpt_path(ckpt_path, run_dir)
    except FileNotFoundError:
        return None  # train() reports it, before anything is built
    path = run_dir_of(checkpoint) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def _new_run_id() -> str:
    """A fresh W&B run id: 8 lower-case letters and digits, as W&B draws them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def offline_by_default() -> bool:
    """Whether W&B must run offline: WANDB_MODE says so, or it finds no credentials (checked locally)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun")
    import wandb

    return not wandb.login(prompt=False, verify=False)


def run_group(choices: Mapping[str, Any], sweep_dir: str | None) -> str:
    """The W&B group: the experiment (the model choice without one), with the sweep directory's name
    (its timestamp) in a multirun (`sweep_dir`)."""
    experiment = choices.get("experiment") or choices.get("model")
    return f"{experiment}-{Path(sweep_dir).name}" if sweep_dir else str(experiment)


def _names(hydra: DictConfig) -> tuple[str, str]:
    """Run name and group from the Hydra config node (`hydra`) of a job."""
    choices = hydra.runtime.choices
    experiment, method = choices.get("experiment") or choices.get("model"), choices.get("method")
    parts = [experiment, method, choices.get("masking")]
    name = "-".join(str(part) for part in parts if part is not None)
    if hydra.mode == RunMode.MULTIRUN:
        return f"{name}-{hydra.job.num}", run_group(choices, hydra.sweep.dir)
    return name, run_group(choices, None)


def _run_names() -> tuple[str | None, str | None]:
    """Default run name and group from the Hydra choices (None, None outside a Hydra run)."""
    if not HydraConfig.initialized():
        return None, None
    return _names(HydraConfig.get())
