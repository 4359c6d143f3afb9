"""What `train.py` and `evaluate.py` run, importable so that tests can call it without a subprocess."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger

from aclip.checkpointing import AtomicCheckpointIO, resolve_ckpt_path
from aclip.config import resolved_job_config, validate_config
from aclip.datamodules.datamodule import ClipDataModule
from aclip.evaluation import EvalLoaders, EvalTask, evaluate, format_table, write_metrics
from aclip.modules.aclip import AClip

log = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every node of a group such as `callbacks` or `logger` (a mapping of named nodes)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def _output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def build_eval_tasks(cfg: DictConfig) -> list[EvalTask]:
    """The evaluation tasks of the `eval` group, each named by its config key unless it sets `name`."""
    return [
        instantiate(node, **({} if "name" in node else {"name": key}))
        for key, node in (cfg.get("eval") or {}).items()
    ]


def evaluate_module(
    module: AClip, tasks: list[EvalTask], loaders: EvalLoaders, device: torch.device | str
) -> Metrics:
    """Evaluate each of the module's reported models on `tasks` (every rank of a process group its share)."""
    module.to(device)
    return {
        name: evaluate(model, tasks, module.tokenizer, loaders)
        for name, model in module.eval_models().items()
    }


def report(metrics: Metrics, output_dir: Path, loggers: list[Any]) -> None:
    """Print the metrics table, write metrics.json and send the values to the loggers."""
    print(format_table(metrics))
    path = write_metrics(metrics, output_dir / "metrics.json")
    log.info("Evaluation written to %s", path)
    flat = {
        f"eval/{model}/{key}": value for model, results in metrics.items() for key, value in results.items()
    }
    # The reported model (listed first, `model.eval_model`) also under the plain keys, for dashboards.
    flat |= {f"eval/{key}": value for key, value in next(iter(metrics.values()), {}).items()}
    for logger in loggers:
        logger.log_metrics(flat)
        logger.save()


def write_timing(fit_seconds: float, steps: int, path: Path) -> None:
    """Record the wall time of `trainer.fit` (data loading included) and its time per optimizer step."""
    timing = {
        "fit_seconds": fit_seconds,
        "optimizer_steps": steps,
        "seconds_per_step": fit_seconds / max(steps, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing, indent=2) + "\n")
    log.info(
        "Training took %.1f s for %d optimizer steps (%.3f s per step)",
        fit_seconds,
        steps,
        timing["seconds_per_step"],
    )


def finish_wandb(loggers: list[Any]) -> None:
    """End the W&B run, so that the next job of a multirun in this process logs to a run of its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def train(cfg: DictConfig) -> Metrics:
    """Train the configured model on the configured data; evaluate it at the end if `cfg.evaluate`."""
    validate_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), _output_dir(cfg))
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: ClipDataModule = instantiate(cfg.data)
    tasks = build_eval_tasks(cfg) if cfg.get("evaluate") else []
    module: AClip = instantiate(cfg.model)
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
    )
    if trainer.world_size > 1 and trainer.strategy.root_device.type == "cpu":
        # Like torchrun, share the cores among the processes instead of each starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // trainer.num_devices))
    for logger in loggers:
        logger.log_hyperparams(resolved_job_config(cfg))
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        write_timing(time.perf_counter() - started, trainer.global_step, _output_dir(cfg) / "timing.json")

    metrics: Metrics = {}
    if cfg.get("evaluate"):
        # Every rank evaluates its share of each set; rank 0 reports the gathered results.
        metrics = evaluate_module(module, tasks, instantiate(cfg.eval_loader), trainer.strategy.root_device)
        if trainer.is_global_zero:
            report(metrics, _output_dir(cfg), loggers)
    finish_wandb(loggers)
    return metrics


def load_checkpoint(path: str | Path) -> AClip:
    """Load a trained module from a Lightning checkpoint, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass ckpt_path=<path to a .ckpt file>")
    try:
        return AClip.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as error:
        raise ValueError(
            f"{path} is not a checkpoint of aclip's model (or was written by an incompatible "
            f"version): {error}"
        ) from error


def evaluate_checkpoint(cfg: DictConfig) -> Metrics:
    """Evaluate `cfg.ckpt_path` on the sets of the `eval` group."""
    module = load_checkpoint(cfg.ckpt_path)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    # The evaluation images must fit the checkpoint's vision tower.
    cfg.eval_loader.image_size = module.hparams.vision["image_size"]
    tasks = build_eval_tasks(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = evaluate_module(module, tasks, instantiate(cfg.eval_loader), device)
    loggers = _instantiate_all(cfg.get("logger"))
    report(metrics, _output_dir(cfg), loggers)
    finish_wandb(loggers)
    return metrics
