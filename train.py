"""Train a CLIP model with token removal: `python train.py [overrides]`, e.g. `masking=none model=vit_b16`.

`aclip-train` is the same app for an installed package (aclip/cli.py)."""

import hydra
from omegaconf import DictConfig

from aclip.cli import check_command_line, run_training
from aclip.errors import report_run_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_run_errors
def main(cfg: DictConfig) -> float | None:
    return run_training(cfg)


if __name__ == "__main__":
    check_command_line()
    main()
