"""A sweep's summary as a W&B run of its own, in the group its jobs logged to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aclip.loggers import offline_by_default, run_group
from aclip.summary.table import Summary


def sweep_groups(sweep_dir: Path, hydra: DictConfig) -> list[str]:
    """The W&B groups the sweep's jobs logged to (several where the sweep varies the experiment), from
    the choices each job folder's `.hydra/hydra.yaml` records; the sweep's own config (`hydra`, whose
    choices are the defaults the jobs override) decides where no job folder tells."""
    groups = []
    for path in sorted(sweep_dir.glob("*/.hydra/hydra.yaml")):
        choices = OmegaConf.load(path).hydra.runtime.choices
        groups.append(run_group(choices, str(sweep_dir)))
    return list(dict.fromkeys(groups)) or [run_group(hydra.runtime.choices, str(sweep_dir))]


def log_sweep_summary(summary: Summary, paths: dict[str, Path], config: DictConfig) -> None:
    """The sweep's per-job table (and its chart) as a W&B run of its own (job type `sweep-summary`) in
    the jobs' group (`logger.wandb.group` where given), one per group."""
    import wandb

    node = config.logger.wandb
    offline = node.get("offline")
    offline = offline_by_default() if offline is None else offline
    header, rows = summary.rows()
    for group in [node.group] if node.get("group") else sweep_groups(summary.sweep_dir, config.hydra):
        run = wandb.init(
            project=node.get("project"),
            group=group,
            name=f"{group}-summary",
            job_type="sweep-summary",
            dir=str(summary.sweep_dir),
            mode="offline" if offline else "online",
        )
        logged: dict[str, Any] = {"sweep/summary": wandb.Table(columns=header, data=rows)}
        if "png" in paths:
            logged["sweep/summary_plot"] = wandb.Image(str(paths["png"]))
        run.log(logged)
        run.finish()
