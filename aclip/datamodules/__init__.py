"""Data sources, transforms, evaluation sets and the LightningDataModule."""
