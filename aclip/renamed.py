"""Config spellings that changed, each with the one that replaced it: a command, a sweep or a config file
that gives an old one stops at start-up with a message naming the new one (Hydra would only say that the
key is not in the config), and a checkpoint that records an old one resumes with the new one.

* The evaluation's settings are one node, `evaluation`: `evaluate` is `evaluation.at_end`, `eval_loader`
  is `evaluation.loader`, and a set's settings `eval.<set>.*` are `evaluation.sets.<set>.*`. The group
  `eval` still chooses the sets: `eval=[imagenet,flickr30k]`.
* The paper's rows are methods, at a scale of the `experiment` group: `experiment=aclip` is
  `experiment=paper method=aclip` (also `aclip_eff`, `clip`).

Light on purpose (no torch): `train.py` checks its command line with it before Hydra starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from aclip.errors import ConfigError, exit_on_input_error

# Old key -> new key; a key under an old one moves with it (eval_loader.batch_size ->
# evaluation.loader.batch_size).
RENAMED_KEYS = {
    "evaluate": "evaluation.at_end",
    "eval_loader": "evaluation.loader",
    "eval": "evaluation.sets",
}
# Config groups whose name is also an old key: the group itself (`eval=[...]`) is current.
GROUPS = {"eval"}
# Old options of a group -> the overrides that compose the same config now.
RENAMED_OPTIONS = {
    ("experiment", row): ("experiment=paper", f"method={row}") for row in ("aclip", "aclip_eff", "clip")
}


def _split(override: str) -> tuple[str, str, str | None]:
    """(prefix `+`, `++` or `~`, key, value or None) of a command-line override."""
    prefix = override[: len(override) - len(override.lstrip("+~"))]
    key, equals, value = override[len(prefix) :].partition("=")
    return prefix, key.strip(), value if equals else None


def new_key(key: str) -> str | None:
    """The current spelling of `key` where it is an old one (or lies under one), else None."""
    head, _, rest = key.partition(".")
    if head not in RENAMED_KEYS or (head in GROUPS and not rest):
        return None
    return f"{RENAMED_KEYS[head]}.{rest}" if rest else RENAMED_KEYS[head]


def renamed(override: str) -> list[str] | None:
    """The overrides that replace an old-spelling `override` (`key=value`, `+key=value`, `~key`), None
    when it is current. A sweep over a renamed group option (`experiment=aclip,paper`) has no one
    replacement: it gives the replacement of its first old option, for the message."""
    prefix, key, value = _split(override)
    key_now = new_key(key)
    if key_now is not None:
        return [f"{prefix}{key_now}" + ("" if value is None else f"={value}")]
    for option in (value or "").split(","):
        if (key, option.strip()) in RENAMED_OPTIONS:
            return list(RENAMED_OPTIONS[key, option.strip()])
    return None


def check_overrides(overrides: Sequence[str], where: str = "on the command line") -> None:
    """Raise `ConfigError` for the first override of an old spelling, naming the current one."""
    for override in overrides:
        if "=" not in override and not override.startswith("~"):
            continue  # a flag of Hydra's (`-m`, `--cfg job`) or its value
        replacement = renamed(override)
        if replacement is None:
            continue
        _, key, _ = _split(override)
        if new_key(key) is not None:
            # `evaluation.at_end` and `evaluation.loader` are in every config: an addition (`+`) of them
            # would be refused (a set of `evaluation.sets` may be new).
            give = replacement[0] if key.startswith("eval.") else replacement[0].lstrip("+")
            raise ConfigError(
                f"{override} {where}: `{key}` is now `{new_key(key)}` (the evaluation's settings are one "
                f"node, `evaluation`); give {give}"
            )
        raise ConfigError(
            f"{override} {where}: the paper's rows are methods now, at the paper's scale: give "
            f"{' '.join(replacement)}"
        )


def translate(overrides: Sequence[str]) -> list[str]:
    """`overrides` with each old spelling replaced by the current one (a checkpoint's record)."""
    return [line for override in overrides for line in (renamed(override) or [override])]


def check_config(cfg: Mapping[str, Any]) -> None:
    """Raise `ConfigError` where a composed config holds an old key (a config file, or a `+` override,
    that sets it), naming the current one."""
    for key in cfg:
        if key in RENAMED_KEYS:
            raise ConfigError(
                f"the config sets `{key}` (a config file of yours or a + override), which is now "
                f"`{RENAMED_KEYS[key]}`: the evaluation's settings are one node, `evaluation`"
            )


class RenamedSweepCheck(Callback):
    """Hydra callback: a multirun whose sweeper varies an old spelling (`hydra.sweeper.params`, e.g. of an
    `hparams_search` file of the user's) stops before its first job, naming the current spelling."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = (config.hydra.get("sweeper") or {}).get("params") or {}
        lines = [f"{key}={value}" for key, value in params.items()]
        exit_on_input_error(check_overrides, lines, "in hydra.sweeper.params")
