"""A trained run read back: its module, rebuilt from the description its checkpoint holds (never unpickling
objects), and the resize filter its run evaluated with. What `evaluate.py`, `aclip.export` and
`aclip.load` start from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aclip.callbacks.resume import RUN_CONFIG_KEY
from aclip.checkpointing import CheckpointError, read_checkpoint, resolve_ckpt_path
from aclip.datamodules.transforms import INTERPOLATIONS
from aclip.modules.aclip import AClip
from aclip.specs import SpecError


def load_checkpoint(path: str | Path) -> AClip:
    """The trained module of a checkpoint file or run directory (its newest last/interrupted checkpoint),
    rebuilt from its description (`AClip.check_hparams`), never unpickling objects."""
    return load_trained(path)[0]


def load_trained(path: str | Path) -> tuple[AClip, str]:
    """`load_checkpoint`'s module and the resize filter its run evaluated with (bicubic for a checkpoint
    without its run's config), from one read of the checkpoint."""
    path = resolve_ckpt_path(path, Path.cwd())
    checkpoint = read_checkpoint(path)
    hparams, state = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of aclip's model: it has no hyper_parameters or state_dict"
        )
    try:
        AClip.check_hparams(hparams)
        module = AClip(**hparams)
        module.load_state_dict(state)
    except SpecError as error:
        raise CheckpointError(f"{path} cannot be loaded: {error}") from None
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a checkpoint of aclip's model (or was written by an incompatible "
            f"version): {error}"
        ) from None
    return module, stored_interpolation(checkpoint, path)


def stored_interpolation(checkpoint: dict[str, Any], path: Path) -> str:
    """The resize filter the checkpoint's run evaluated with, from its run config record (bicubic for a
    checkpoint without one), checked to be one of `INTERPOLATIONS`: the record is data, and what is read
    from it reaches the evaluation's loader and the export's preprocessing."""
    record = checkpoint.get(RUN_CONFIG_KEY)
    if record is None:
        return "bicubic"
    evaluation = record.get("evaluation") if isinstance(record, dict) else None
    if isinstance(evaluation, dict) and "loader" in evaluation:
        key, loader = "evaluation.loader", evaluation["loader"]
    else:  # a run from before the evaluation's settings were one node (aclip.renamed)
        key, loader = "eval_loader", record.get("eval_loader") if isinstance(record, dict) else None
    interpolation = loader.get("interpolation", "bicubic") if isinstance(loader, dict) else loader
    if not (isinstance(interpolation, str) and interpolation in INTERPOLATIONS):
        raise CheckpointError(
            f"{path} records {RUN_CONFIG_KEY}.{key}.interpolation={interpolation!r}, which is not one of "
            f"{sorted(INTERPOLATIONS)}: the file was altered or written by another program. Use a "
            "checkpoint written by aclip"
        )
    return interpolation
