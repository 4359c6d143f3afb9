"""The entry points: `train.py` and `evaluate.py` in the repository, `aclip-train` and `aclip-eval` after
`pip install` (the same Hydra apps, run from any directory, with the configs shipped in the package)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

import aclip  # noqa: F401  (registers the config resolvers before Hydra resolves any path)
from aclip.errors import exit_on_input_error, report_run_errors
from aclip.renamed import check_overrides


def config_dir() -> str:
    """The Hydra configs: `aclip/conf` inside an installed package, else the source checkout's `conf/`."""
    package = Path(__file__).resolve().parent
    packaged = package / "conf"
    return str(packaged if packaged.is_dir() else package.parent / "conf")


def compose(config_name: str, overrides: Sequence[str] = (), output_dir: Path | None = None) -> DictConfig:
    """`<config_name>.yaml` of the app's configs with `overrides`, composed as `train.py` or `evaluate.py`
    would (for tests, benchmarks and notebooks). With `output_dir`, Hydra's runtime config is set as for
    a run writing there (the launch directory: the current one)."""
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra.compose(
            config_name, overrides=list(overrides), return_hydra_config=output_dir is not None
        )
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.runtime.cwd = str(Path.cwd())
        HydraConfig.instance().set_config(cfg)
    return cfg


def run_training(cfg: DictConfig) -> float | None:
    """Train and evaluate as `cfg` says (with `ckpt_path=<run>`, the run's own config composed again, then
    this command's overrides: `aclip.recompose`); the value of `optimized_metric`, which sweepers that
    optimise (hparams_search=optuna_lr) maximise. Under such a sweeper the metric is checked before
    training; a single run whose evaluation lacks it finishes with a warning instead."""
    # Imported here, so that `--help` and shell completion need not load torch and Lightning.
    from aclip.config import check_optimized_metric
    from aclip.recompose import compose_resumed
    from aclip.tasks import optimized_value, train

    cfg, overrides = compose_resumed(cfg, config_dir())
    optimising = sweeper_optimises()
    if optimising:
        check_optimized_metric(cfg)
    return optimized_value(train(cfg, overrides), cfg.get("optimized_metric"), required=optimising)


def sweeper_optimises() -> bool:
    """Whether this job runs under a sweeper that reads its return value (Optuna's, not Hydra's basic
    sweeper, which only lists jobs)."""
    if not HydraConfig.initialized():
        return False
    hydra_config = HydraConfig.get()
    return hydra_config.mode == RunMode.MULTIRUN and not hydra_config.sweeper._target_.endswith(
        ".BasicSweeper"
    )


def run_evaluation(cfg: DictConfig) -> None:
    """Evaluate the checkpoint `cfg.ckpt_path` on `evaluation.sets` (the `eval` group's)."""
    from aclip.tasks import evaluate_checkpoint

    evaluate_checkpoint(cfg)


def check_command_line(arguments: Sequence[str] | None = None) -> None:
    """Stop a command whose overrides (default: this process's arguments) use an old spelling of a
    renamed key or option (`aclip.renamed`), printing the current one, before Hydra composes the config
    (its own error would only say that the key is not in it)."""
    exit_on_input_error(check_overrides, sys.argv[1:] if arguments is None else arguments)


def train() -> None:
    """`aclip-train [overrides]`: `python train.py [overrides]` from any directory."""
    check_command_line()
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")(
        report_run_errors(run_training)
    )()


def evaluate() -> None:
    """`aclip-eval ckpt_path=<checkpoint> [overrides]`: `python evaluate.py ...` from any directory."""
    check_command_line()
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")(
        report_run_errors(run_evaluation)
    )()
