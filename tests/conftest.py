"""Shared fixtures: composing the project's Hydra configs for small, fast runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A model and data small enough for a CPU test: 32 px images, 16 patches, two-layer towers.
TINY_OVERRIDES = [
    "model.vision.image_size=32",
    "model.text.context_length=16",
    "model.embed_dim=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.train.size=32",
    "eval.synthetic.dataset.size=48",
    "eval.synthetic_retrieval.dataset.size=12",
    "eval_loader.batch_size=32",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose `conf/<config_name>.yaml` as Hydra's app would, with this run's directory set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[*overrides, f"hydra.run.dir={output_dir}", f"paths.log_dir={output_dir}/logs"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(CONF_DIR.parent)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def train_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """`train_config(*overrides)`: the tiny training config writing into a temporary run directory."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        # The sizes of the built-in sets apply only while those sets are chosen.
        base = TINY_OVERRIDES
        if any(o.startswith("data=") and o != "data=synthetic" for o in overrides):
            base = [o for o in base if not o.startswith("data.train.")]
        if any(o.startswith("eval=") for o in overrides):
            base = [o for o in base if not o.startswith("eval.synthetic")]
        return compose_config("train", [*base, *overrides], output_dir or tmp_path / "run")

    return make
