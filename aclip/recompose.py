"""Resuming without retyping the run: `ckpt_path=<run>` composes the run's config again, from the
command-line overrides its checkpoint records (`RUN_OVERRIDES_KEY`), then this command's, which win.

A checkpoint is data, so its record only ever chooses what a user could choose on the command line from
this project's configs: options of the config groups (`model=vit_b16`, `eval=[imagenet]`, checked
against the group's files) and plain values of keys the configs define (`data.batch_size=256`). An
override that names code or builds structure (a `_target_`, a `+` addition, a mapping, an interpolation,
which a resolver could turn into one) is left out and named, for the user to give again; Hydra's own
(`hydra.*`) and `ckpt_path` belong to each command. The composed config is then compared with the run's
(`aclip.callbacks.resume.check_resumed_config`), as any resume is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from aclip.callbacks.resume import RUN_OVERRIDES_KEY
from aclip.checkpointing import CheckpointError, read_checkpoint, resolve_ckpt_path
from aclip.errors import ConfigError
from aclip.renamed import translate

log = logging.getLogger(__name__)

# Config keys that make Hydra's `instantiate` import or call something.
_CODE_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
# Overrides that belong to each command, never taken from a checkpoint.
_OWN = ("hydra", "ckpt_path")


def job_overrides() -> list[str]:
    """This Hydra job's command-line overrides (none outside a Hydra app)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def replayable_overrides(
    overrides: Sequence[str], group_options: Callable[[str], list[str]]
) -> tuple[list[str], list[str]]:
    """Of a run's recorded `overrides`, those a resume composes again and those it leaves out (see the
    module); `group_options(key)` lists the options of the config group `key` ([] if it is not one)."""
    parser = OverridesParser.create()
    kept, left_out = [], []
    for line in overrides:
        try:
            (override,) = parser.parse_overrides([line])
        except HydraException:
            left_out.append(line)
            continue
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] in _OWN:
            continue
        if override.is_delete():
            replayable = not _CODE_KEYS & set(key.split("."))
        elif override.is_add() or override.is_sweep_override() or override.package is not None:
            replayable = False
        elif options := group_options(key):
            value = override.value()
            chosen = value if isinstance(value, list) else [value]
            replayable = all(option is None or option in options for option in chosen)
        else:
            replayable = not _CODE_KEYS & set(key.split(".")) and _plain(override.value())
        (kept if replayable else left_out).append(line)
    return kept, left_out


def _plain(value: Any) -> bool:
    """A number, string (without interpolation), boolean, None, or a list of those."""
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return (
        value is None
        or isinstance(value, (bool, int, float))
        or (isinstance(value, str) and "${" not in value)
    )


def compose_resumed(cfg: DictConfig, config_dir: str) -> tuple[DictConfig, list[str]]:
    """The config to train and the command-line overrides it was composed with: for `ckpt_path=<run>`,
    the app's config composed from the overrides its checkpoint records, then this command's; otherwise
    (or for a checkpoint without the record) `cfg` itself. `config_dir`: the app's configs, for a
    composition outside a running Hydra app (tests, notebooks).

    Raises:
        FileNotFoundError: `ckpt_path` names nothing to resume from.
        ConfigError: the recorded overrides no longer compose with this command's (the configs changed).
    """
    typed = job_overrides()
    if cfg.get("ckpt_path") is None:
        return cfg, typed
    output_dir = Path(
        HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.paths.output_dir
    )
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    recorded = read_checkpoint(ckpt_path).get(RUN_OVERRIDES_KEY)
    if not recorded:
        return cfg, typed
    if not isinstance(recorded, list) or not all(isinstance(line, str) for line in recorded):
        raise CheckpointError(
            f"{ckpt_path} records its run's overrides as {type(recorded).__name__}, not a list of strings: "
            "the file was altered or written by another program"
        )
    config_name = HydraConfig.get().job.config_name if HydraConfig.initialized() else "train"
    with _hydra(config_dir):
        options = GlobalHydra.instance().config_loader().get_group_options
        # A run from before a rename records the old spellings: it resumes with the current ones.
        kept, left_out = replayable_overrides(translate(recorded), options)
        overrides = [*kept, *typed]
        try:
            composed = hydra.compose(config_name, overrides)
        except HydraException as error:
            raise ConfigError(
                f"{ckpt_path} records its run's overrides {kept}, which no longer compose with this "
                f"command's ({error}); give the run's overrides yourself"
            ) from None
    if left_out:
        log.warning(
            "Not taken from %s (a checkpoint cannot name code or add keys): %s. Give those of them that "
            "the run needs again.",
            ckpt_path,
            " ".join(left_out),
        )
    log.info("Resuming %s with its run's overrides %s, then this command's %s", ckpt_path, kept, typed)
    return composed, overrides


@contextlib.contextmanager
def _hydra(config_dir: str) -> Iterator[None]:
    """The running app's Hydra, or one initialised on `config_dir` for the duration."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with hydra.initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            yield
