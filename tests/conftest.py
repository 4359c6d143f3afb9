"""Shared fixtures: composing the project's Hydra configs for small, fast runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from aclip.cli import compose

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A model and data small enough for a CPU test: 32 px images, 16 patches, two-layer towers.
TINY_OVERRIDES = [
    "model.vision.image_size=32",
    "model.text.context_length=16",
    "model.embed_dim=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "eval_loader.batch_size=32",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# Small built-in sets, applied while those sets are chosen (an experiment may choose others).
SYNTHETIC_DATA_OVERRIDES = ["data.train.size=32"]
SYNTHETIC_EVAL_OVERRIDES = ["eval.synthetic.dataset.size=48", "eval.synthetic_retrieval.dataset.size=12"]
# The tiny run on the default (built-in) data and evaluation sets.
TINY_SYNTHETIC_OVERRIDES = [*TINY_OVERRIDES, *SYNTHETIC_DATA_OVERRIDES, *SYNTHETIC_EVAL_OVERRIDES]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose `conf/<config_name>.yaml` as Hydra's app would, with this run's directory set."""
    run_directory = [f"hydra.run.dir={output_dir}", f"paths.log_dir={output_dir}/logs"]
    return compose(config_name, [*overrides, *run_directory], output_dir)


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


def run_train_py(
    *arguments: str, cwd: Path, timeout: int = 300, env: Mapping[str, str] | None = None
) -> None:
    """Run `python train.py <arguments>` as a user would; a failure shows the end of its stderr."""
    command = [sys.executable, str(CONF_DIR.parent / "train.py"), *arguments]
    environment = {**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})}
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=timeout, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-4000:]


def override_value(job_dir: Path, key: str) -> str:
    """The value a Hydra job was given for `key` on the command line (its `.hydra/overrides.yaml`)."""
    overrides = (job_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    return next(line.split("=", 1)[1] for line in overrides if line.lstrip("- ").startswith(f"{key}="))


def callback_overrides(module: str, name: str, **kwargs: Any) -> list[str]:
    """Overrides adding the callback class `name` of the test module `module`, imported by Hydra."""
    return [
        f"+callbacks.{name}._target_={module}.{name}",
        *(f"+callbacks.{name}.{key}={value}" for key, value in kwargs.items()),
    ]
