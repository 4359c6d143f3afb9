"""Train a CLIP model with token removal: `python train.py [overrides]`, e.g. `masking=none model=vit_b16`."""

import hydra
from omegaconf import DictConfig

from aclip.tasks import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
