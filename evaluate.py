"""Evaluate a checkpoint: `python evaluate.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt`."""

import hydra
from omegaconf import DictConfig

import aclip  # noqa: F401  (registers the config resolvers before Hydra resolves any path)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    # Imported here, so that `--help` and shell completion need not load torch and Lightning.
    from aclip.tasks import evaluate_checkpoint

    evaluate_checkpoint(cfg)


if __name__ == "__main__":
    main()
