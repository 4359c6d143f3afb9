"""The fixtures the tests share (the plumbing they import is in `tests/helpers.py`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from tests.helpers import SYNTHETIC_DATA_OVERRIDES, SYNTHETIC_EVAL_OVERRIDES, TINY_OVERRIDES, compose_config


@pytest.fixture
def train_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """`train_config(*overrides)`: the tiny training config writing into a temporary run directory."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        output_dir = output_dir or tmp_path / "run"
        cfg = compose_config("train", [*TINY_OVERRIDES, *overrides], output_dir)
        sizes = [
            *(SYNTHETIC_DATA_OVERRIDES if cfg.hydra.runtime.choices.data == "synthetic" else []),
            *(SYNTHETIC_EVAL_OVERRIDES if "synthetic" in cfg.evaluation.sets else []),
        ]
        # The small built-in sets, set in the composed config (one composition, not two); a size the
        # test gives on its own wins.
        given = {override.split("=", 1)[0] for override in overrides}
        for key, value in (size.split("=", 1) for size in sizes):
            if key not in given:
                OmegaConf.update(cfg, key, int(value))
        return cfg

    return make
