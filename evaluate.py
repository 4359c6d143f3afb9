"""Evaluate a checkpoint: `python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt`.

`aclip-eval` is the same app for an installed package (aclip/cli.py)."""

import hydra
from omegaconf import DictConfig

from aclip.cli import check_command_line, run_evaluation
from aclip.errors import report_run_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@report_run_errors
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg)


if __name__ == "__main__":
    check_command_line()
    main()
