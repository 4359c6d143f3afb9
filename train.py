"""Train a CLIP model with token removal: `python train.py [overrides]`, e.g. `masking=none model=vit_b16`."""

import hydra
from omegaconf import DictConfig

import aclip  # noqa: F401  (registers the config resolvers before Hydra resolves any path)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here, so that `--help` and shell completion need not load torch and Lightning.
    from aclip.tasks import optimized_value, train

    # The value of `optimized_metric`, which sweepers that optimise (hparams_search=optuna_lr) maximise.
    return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
