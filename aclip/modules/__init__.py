"""Layer 5, model parts: towers, masking, losses, heads, schedule (aclip.py, the LightningModule: 3)."""
