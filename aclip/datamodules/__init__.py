"""Layer 4, data and evaluation: data sources, transforms, evaluation sets and the LightningDataModule."""
