"""What `train.py` and `evaluate.py` run, importable so that tests can call it without a subprocess."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger

from aclip.callbacks.resume import RUN_CONFIG_KEY, RUN_OVERRIDES_KEY, RunConfigRecord, check_resumed_config
from aclip.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    check_checkpoint_file_paths,
    read_checkpoint,
    resolve_ckpt_path,
)
from aclip.compute import plan_compute
from aclip.config import check_required, resolved_job_config, validate_config
from aclip.console import print_model_summary, print_run_header, progress_bars, quiet_known_noise
from aclip.datamodules.datamodule import ClipDataModule
from aclip.evaluation import EvalTask, Evaluation, EvaluationError, Metrics, format_table, write_metrics
from aclip.evaluation.masked import fold_masked, masked_views, with_masked_views
from aclip.evaluation.report import flatten_metrics, write_chance_levels
from aclip.modules.aclip import TEACHER_WARMUP_KEY, AClip
from aclip.modules.teacher_warmup import check_state as check_warmup_state
from aclip.recompose import job_overrides
from aclip.renamed import check_config
from aclip.specs import SpecError
from aclip.trained import load_trained

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every node of a group such as `callbacks` or `logger` (a mapping of named nodes)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def _output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def build_eval_tasks(cfg: DictConfig) -> list[EvalTask]:
    """The evaluation tasks of `evaluation.sets` (the `eval` group's), each named by its config key unless
    it sets `name`."""
    return [
        instantiate(node, **({} if "name" in node else {"name": key}))
        for key, node in (cfg.evaluation.get("sets") or {}).items()
    ]


def build_evaluation(cfg: DictConfig) -> Evaluation:
    """The tasks of `evaluation.sets` with the `evaluation.loader` settings."""
    return Evaluation(build_eval_tasks(cfg), instantiate(cfg.evaluation.loader))


def validation_schedule(cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments that run `evaluation.sets` as Lightning validation every `evaluation.every_n_steps`
    optimizer steps or `evaluation.every_n_epochs` epochs (neither: no validation)."""
    schedule = cfg.get("evaluation") or {}
    steps, epochs = schedule.get("every_n_steps"), schedule.get("every_n_epochs")
    if not (steps or epochs):
        return {"limit_val_batches": 0}
    # Validation sees whole sets: no limit (None: all, without Lightning's message), no sanity check.
    whole_sets = {"limit_val_batches": None, "num_sanity_val_steps": 0}
    if steps:
        batches = steps * cfg.trainer.get("accumulate_grad_batches", 1)
        return whole_sets | {"val_check_interval": batches, "check_val_every_n_epoch": None}
    return whole_sets | {"check_val_every_n_epoch": epochs}


def optimized_value(metrics: Metrics, key: str | None, required: bool = True) -> float | None:
    """The reported model's `key` metric (`optimized_metric`), which `train.py` returns to the sweeper.

    A `key` the evaluation lacks is an error where the value is `required` (a sweeper maximises it);
    otherwise it is logged and None returned, since nothing reads the value of a single run.
    """
    if not key or not metrics:
        return None
    reported = next(iter(metrics.values()))
    if key in reported:
        return reported[key]
    missing = f"optimized_metric={key} is not among the evaluation's metrics {sorted(reported)}"
    if required:
        raise KeyError(f"{missing}; set optimized_metric to one of them (or null)")
    log.warning(
        "%s: nothing to return. Only a sweeper that optimises reads it: set optimized_metric to one of "
        "them before such a sweep",
        missing,
    )
    return None


def report(metrics: Metrics, output_dir: Path, loggers: list[Any], evaluation: Evaluation) -> None:
    """Print the metrics table, write metrics.json (and chance.json, the chance levels, which the sweep
    summary draws) and send the values to the loggers."""
    chance = evaluation.chance_levels()
    print(format_table(metrics, evaluation.reported_metrics(), chance))
    path = write_metrics(metrics, output_dir / "metrics.json")
    write_chance_levels(chance, output_dir / "chance.json")
    log.info("Evaluation written to %s", path)
    flat = flatten_metrics(metrics, "eval")
    for logger in loggers:
        logger.log_metrics(flat)
        logger.save()


def write_timing(
    fit_seconds: float,
    validation_seconds: float,
    steps: int,
    kept_tokens: int,
    num_views: int,
    path: Path,
    token_choice: dict[str, Any] | None = None,
    compute: dict[str, Any] | None = None,
) -> None:
    """Record the wall time of this process's `trainer.fit` (data loading included), the part of it spent
    on validation, the training time per optimizer step it took (validation left out), the patch tokens
    per view that the online image encoder saw, how they were chosen (`token_choice`, e.g. the step
    the teacher took over, `AClip.token_choice`), and the run's FLOPs (`compute`,
    `aclip.compute.ComputePlan.record`: a run of several phases replaces the tokens and views by their
    means over its steps)."""
    timing = {
        "fit_seconds": fit_seconds,
        "validation_seconds": validation_seconds,
        "optimizer_steps": steps,
        "seconds_per_step": (fit_seconds - validation_seconds) / max(steps, 1),
        "kept_tokens": kept_tokens,
        "num_views": num_views,
        **(token_choice or {}),
        **(compute or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing, indent=2) + "\n")
    log.info(
        "Training took %.1f s for %d optimizer steps (%.3f s per step)",
        fit_seconds,
        steps,
        timing["seconds_per_step"],
    )


def finish_wandb(loggers: list[Any], failed: bool = False) -> None:
    """End the W&B run (as failed after an error), so that the next job of a multirun in this process
    logs to a run of its own."""
    for logger in loggers:
        # `_experiment` is None until the run was started; `.experiment` would start one.
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=1 if failed else 0)


class TrainingError(RuntimeError):
    """A run that ended without training (a non-zero exit, not a run that seems to have succeeded)."""


def inspect_resumed(ckpt_path: Path, run_config: dict[str, Any]) -> int:
    """Check the checkpoint a run resumes from before anything is built: readable, a description of
    this project's model (no code), a config that the current one may continue. Returns its step."""
    checkpoint = read_checkpoint(ckpt_path)
    check_checkpoint_file_paths(checkpoint, ckpt_path)
    try:
        AClip.check_hparams(checkpoint.get("hyper_parameters", {}))
        if TEACHER_WARMUP_KEY in checkpoint:
            check_warmup_state(checkpoint[TEACHER_WARMUP_KEY])
    except SpecError as error:
        raise CheckpointError(f"{ckpt_path} cannot be resumed: {error}") from None
    records_overrides = checkpoint.get(RUN_OVERRIDES_KEY) is not None
    check_resumed_config(checkpoint.get(RUN_CONFIG_KEY), run_config, str(ckpt_path), records_overrides)
    return int(checkpoint.get("global_step", 0))


def _evaluate(
    evaluation: Evaluation, module: AClip, settings: DictConfig | None = None
) -> tuple[Metrics, EvaluationError | None]:
    """The evaluation's metrics, with those on masked views where `settings` (`evaluation` in the config)
    asks for them (`aclip.evaluation.masked`), and the error of the tasks that failed (the others still
    count)."""
    views = masked_views(settings)
    models = with_masked_views(module.eval_models(), module.masking, module.ema_model.vision, views)
    try:
        return fold_masked(evaluation.run(models, module.tokenizer)), None
    except EvaluationError as error:
        return fold_masked(error.metrics), error


def train(cfg: DictConfig, overrides: Sequence[str] | None = None) -> Metrics:
    """Train the configured model on the configured data; evaluate it at the end if
    `cfg.evaluation.at_end`.

    `overrides`: the command-line overrides `cfg` was composed with (default: this Hydra job's), recorded
    in its checkpoints so that `ckpt_path=<run>` alone composes it again (`aclip.recompose`).
    """
    quiet_known_noise()
    validate_config(cfg)
    output_dir = _output_dir(cfg)
    run_config = resolved_job_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    start_step = inspect_resumed(ckpt_path, run_config) if ckpt_path is not None else 0
    print_run_header(cfg, output_dir)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    schedule = validation_schedule(cfg)
    validating = schedule["limit_val_batches"] != 0
    evaluation = build_evaluation(cfg) if cfg.evaluation.at_end or validating else None
    if evaluation is not None:
        evaluation.check()  # a broken evaluation image stops the run now, not after training
    datamodule: ClipDataModule = instantiate(cfg.data, evaluation=evaluation if validating else None)
    module: AClip = instantiate(cfg.model)
    compute = plan_compute(cfg, module, datamodule)  # FLOPs per step; the budget's length
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    callbacks += progress_bars(cfg.trainer.get("enable_progress_bar", True), callbacks)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[
            *callbacks,
            RunConfigRecord(run_config, job_overrides() if overrides is None else overrides),
        ],
        logger=loggers,
        plugins=[AtomicCheckpointIO()],
        **schedule,
        **compute.trainer_limits(),
    )
    if trainer.world_size > 1 and trainer.strategy.root_device.type == "cpu":
        # Like torchrun, share the cores among the processes instead of each starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // trainer.num_devices))
    for logger in loggers:
        logger.log_hyperparams(run_config)
    print_model_summary(*module.summary())
    started = time.perf_counter()
    try:
        # Checkpoints hold tensors and plain containers only: never unpickle objects (code) from one.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if trainer.global_step == start_step:
            raise TrainingError(
                f"the run took no optimizer step (stopped at step {trainer.global_step}, "
                f"trainer.max_epochs={cfg.trainer.get('max_epochs')}, trainer.max_steps="
                f"{cfg.trainer.get('max_steps')})"
                + (
                    f"; {ckpt_path} had already reached them: raise them to train further"
                    if ckpt_path
                    else ""
                )
            )
    except BaseException:
        finish_wandb(loggers, failed=True)
        raise
    if trainer.is_global_zero:
        write_timing(
            time.perf_counter() - started,
            module.validation_seconds,
            trainer.global_step - start_step,
            module.kept_tokens(module.phases[0]),
            datamodule.view_transform.num_views,
            output_dir / "timing.json",
            module.token_choice(),
            compute.record(module, trainer.global_step, datamodule.view_transform.num_views),
        )

    metrics: Metrics = {}
    if cfg.evaluation.at_end:
        # Every rank evaluates its share of each set; rank 0 reports the gathered results.
        module.to(trainer.strategy.root_device)
        metrics, failed = _evaluate(evaluation, module, cfg.get("evaluation"))
        if trainer.is_global_zero:
            report(metrics, output_dir, loggers, evaluation)
        if failed is not None:
            finish_wandb(loggers, failed=True)
            raise failed
    finish_wandb(loggers)
    return metrics


def load_for_evaluation(cfg: DictConfig) -> tuple[AClip, Evaluation]:
    """The module of `cfg.ckpt_path` on the device, and `evaluation.sets` (checked) loaded at its
    image size with the resize filter its run evaluated with."""
    module, interpolation = load_trained(cfg.ckpt_path)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    loader = cfg.evaluation.loader
    loader.image_size = module.model.vision.image_size
    if loader.get("interpolation") is None:
        loader.interpolation = interpolation
    evaluation = build_evaluation(cfg)
    evaluation.check()
    return module.to("cuda" if torch.cuda.is_available() else "cpu"), evaluation


def evaluate_checkpoint(cfg: DictConfig) -> Metrics:
    """Evaluate `cfg.ckpt_path` on `evaluation.sets` (the `eval` group's)."""
    quiet_known_noise()
    check_config(cfg)
    check_required(cfg)
    module, evaluation = load_for_evaluation(cfg)
    metrics, failed = _evaluate(evaluation, module, cfg.get("evaluation"))
    loggers = _instantiate_all(cfg.get("logger"))
    report(metrics, _output_dir(cfg), loggers, evaluation)
    finish_wandb(loggers, failed=failed is not None)
    if failed is not None:
        raise failed
    return metrics
