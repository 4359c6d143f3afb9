"""What Lightning leaves out of a resume: the global random states, (Lightning issue #20550) the
dataloader position when `configure_optimizers` reads `trainer.estimated_stepping_batches`, and the rest
of an epoch that `trainer.max_steps` cut short."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from aclip.distributed import rank_and_world

log = logging.getLogger(__name__)


def collect_random_states() -> dict[str, Any]:
    """The random states of Python, NumPy, torch and CUDA, as tensors and numbers only.

    Checkpoints stay loadable with `torch.load(..., weights_only=True)`.
    """
    version, python_state, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": {
            "version": version,
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_random_states(states: dict[str, Any]) -> None:
    """Set the states that `collect_random_states` returned (CUDA's only where the device count matches)."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["position"], numpy["has_gauss"], numpy["cached_gauss"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def continue_cut_short_epoch(loops: dict[str, Any]) -> tuple[int, int] | None:
    """Make the loop progress of a checkpoint written after training stopped part way through an epoch
    (`trainer.max_steps` reached, or a stop) resume inside that epoch; that epoch's number and the batches
    it trained on, or None for another checkpoint.

    Lightning counts such an epoch as processed (and, in a checkpoint saved when training ended, as
    completed), so a resume with a higher `max_steps` would start the next epoch and skip the rest of
    this one, or, at `max_epochs`, take no step at all. The progress becomes that of a checkpoint saved
    after the same batch in the middle of the epoch, which Lightning resumes at the next batch (and
    `ResumableDataLoader`, whose position the checkpoint holds, reads the epoch on from there).
    """
    fit = loops.get("fit_loop") or {}
    epochs, batches = fit.get("epoch_progress"), fit.get("epoch_loop.batch_progress")
    if not epochs or not batches or batches.get("is_last_batch", True):
        return None  # the epoch ran to its last batch (or the checkpoint is not Lightning's)
    epoch, batch = epochs["current"], batches["current"]
    epoch_ended = epoch["ready"] == epoch["started"] == epoch["processed"] > 0
    if not epoch_ended or epoch["completed"] < epoch["processed"] - 1:
        return None  # saved in the middle of the epoch, where Lightning resumes on its own
    if not 0 < batch["completed"] == batch["processed"]:
        return None
    for progress in (epochs["total"], epoch):
        progress["processed"] -= 1
        progress["completed"] = progress["processed"]
    for progress in (batches["total"], batch):
        progress["completed"] -= 1
    # Lightning adds the batch back when it resumes after a batch's end (it saves this count one short).
    fit["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    return epoch["processed"], batch["processed"]


class ResumeState(Callback):
    """Makes a resumed run continue exactly where its checkpoint left off.

    * Saves the global random states (Python, NumPy, torch, CUDA) of every rank in every checkpoint and
      restores each rank's own when training starts, so the augmentations drawn in the main process
      (`data.num_workers=0`), dropout and drop-path continue as in an uninterrupted run. (The masking
      generator is reseeded from the step and needs no state.) Resumed with another number of ranks,
      every rank takes rank 0's states.
    * Hands the dataloader states of the checkpoint to the training dataloaders (`ResumableDataLoader`
      positions) when Lightning has not: it loads them only if it builds the dataloader after restoring
      the checkpoint, and `AClip.configure_optimizers` makes it build it before (Lightning #20550).
    * Continues an epoch that `trainer.max_steps` cut short where it stopped
      (`continue_cut_short_epoch`), so that raising `max_steps` trains on the rest of that epoch.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._restored: list[dict[str, Any]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # Every rank writes a checkpoint's content (Lightning's `save_checkpoint` runs on all of them).
        states = collect_random_states()
        if self._trainer is None or self._trainer.world_size == 1 or rank_and_world()[1] == 1:
            return {"ranks": [states]}
        gathered: list[Any] = [None] * self._trainer.world_size
        dist.all_gather_object(gathered, states)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("ranks") or None

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called with the checkpoint that Lightning restores its loops from next.
        cut_short = continue_cut_short_epoch(checkpoint.get("loops") or {})
        if cut_short is not None:
            epoch, batches = cut_short
            _info(
                f"The checkpoint stopped after {batches} batches of epoch {epoch}: training continues there"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if getattr(fit_loop, "_combined_loader_states_to_load", None):
            fit_loop._load_combined_loader_states()  # a no-op once Lightning loads them itself
        # Last, so that nothing between the restore and the first batch draws from the restored states.
        if self._restored is not None:
            same_world = len(self._restored) == trainer.world_size
            if not same_world:
                rank_zero_warn(
                    f"the checkpoint holds the random states of {len(self._restored)} ranks, this run has "
                    f"{trainer.world_size}: every rank continues from rank 0's"
                )
            restore_random_states(self._restored[trainer.global_rank if same_world else 0])
            self._restored = None


# The run's resolved config, saved in every checkpoint under this key, so that a resume can compare.
RUN_CONFIG_KEY = "aclip_run_config"
# The command-line overrides the run's config was composed with, saved beside it, so that
# `ckpt_path=<run>` alone composes the same config again (`aclip.recompose`).
RUN_OVERRIDES_KEY = "aclip_run_overrides"
# Keys a resumed run may change without comment: where it writes, how it logs, evaluates and reports,
# and how long it trains.
MAY_CHANGE = (
    "paths",
    "trainer.default_root_dir",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.interrupt_checkpoint.dirpath",
    "logger",
    "evaluation",
    # The evaluation's keys before they were one node (aclip.renamed), which older checkpoints record.
    "eval",
    "evaluate",
    "eval_loader",
    "ckpt_path",
    "task_name",
    "optimized_metric",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.enable_progress_bar",
    "print_config",
    "trainer.log_every_n_steps",
    "callbacks.mask_pictures",
    "callbacks.throughput",
    "callbacks.model_checkpoint",
    "callbacks.step_checkpoint",
    "data.num_workers",
)
# The optimizer and learning-rate schedule: a resumed run follows the current config's values
# (`AClip.on_train_start`), e.g. a lower model.optimizer.lr after a NaN stop.
APPLIED = ("model.optimizer", "model.scheduler")
# What shapes the parameters, which the checkpoint's weights must match, and the optimizer's class,
# whose state the checkpoint holds.
REFUSED = (
    "model.vision",
    "model.text",
    "model.embed_dim",
    "model.self_supervision",
    "model.optimizer._target_",
)


class RunConfigRecord(Callback):
    """Saves the run's resolved config (`RUN_CONFIG_KEY`) and the command-line overrides it was composed
    with (`RUN_OVERRIDES_KEY`) in every checkpoint."""

    def __init__(self, config: dict[str, Any], overrides: Sequence[str] = ()) -> None:
        self.config, self.overrides = config, list(overrides)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config
        checkpoint[RUN_OVERRIDES_KEY] = self.overrides


@rank_zero_only
def _warn(message: str) -> None:
    log.warning(message)  # logged (not a Python warning), so that it reaches the run's log file


@rank_zero_only
def _info(message: str) -> None:
    log.info(message)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): config}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two resolved configs: key -> (saved, current)."""
    before, after = _flatten(saved), _flatten(current)
    missing = object()
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key, missing) != after.get(key, missing)
    }


def check_resumed_config(
    saved: dict[str, Any] | None, current: dict[str, Any], ckpt_path: str, records_overrides: bool = True
) -> None:
    """Compare the config of the run being resumed with this one's: refuse changes to the model's shape,
    say which optimizer settings now apply, and list every other difference. `records_overrides`: the
    checkpoint holds the run's command-line overrides (`RUN_OVERRIDES_KEY`)."""
    if saved is None:
        rank_zero_warn(
            f"{ckpt_path} holds no run config (an older checkpoint): the resumed config is not compared"
        )
        return
    changes = {
        key: values for key, values in config_changes(saved, current).items() if not _under(key, MAY_CHANGE)
    }
    lines = {key: f"  {key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()}
    refused = [line for key, line in lines.items() if _under(key, REFUSED)]
    if refused:
        composed = (
            "`ckpt_path=<run>` alone composes the run's own config"
            if records_overrides
            else f"{ckpt_path} does not record its run's command line (an older checkpoint), so this "
            "config holds the defaults where the run had overrides: give them again (its run "
            "directory's .hydra/overrides.yaml lists them)"
        )
        raise ValueError(
            f"resuming {ckpt_path} with a different model or optimizer than its run's: the checkpoint's "
            "weights and optimizer state cannot fit (the run's value -> this config's)\n"
            + "\n".join(refused)
            + f"\nTo resume, give these keys the run's values ({composed}), or start a new run."
        )
    applied = [line for key, line in lines.items() if _under(key, APPLIED)]
    other = [line for key, line in lines.items() if not _under(key, APPLIED)]
    if applied:
        _info("Resuming with this config's optimizer settings:\n" + "\n".join(applied))
    if other:
        _warn(
            "Resuming with a config that differs from the run's (the data position, schedules and results "
            "may not continue as they would have):\n" + "\n".join(other)
        )
