"""Towers, token reduction, losses and the LightningModule."""
