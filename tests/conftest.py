"""The fixtures the tests share (the plumbing they import is in `tests/helpers.py`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import SYNTHETIC_DATA_OVERRIDES, SYNTHETIC_EVAL_OVERRIDES, TINY_OVERRIDES, compose_config


@pytest.fixture
def train_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """`train_config(*overrides)`: the tiny training config writing into a temporary run directory."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        output_dir = output_dir or tmp_path / "run"
        cfg = compose_config("train", [*TINY_OVERRIDES, *overrides], output_dir)
        sizes = [
            *(SYNTHETIC_DATA_OVERRIDES if cfg.hydra.runtime.choices.data == "synthetic" else []),
            *(SYNTHETIC_EVAL_OVERRIDES if "synthetic" in cfg.eval else []),
        ]
        return compose_config("train", [*TINY_OVERRIDES, *sizes, *overrides], output_dir) if sizes else cfg

    return make
